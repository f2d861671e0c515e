"""``megapairs``: one subcommand per stage, one for the whole pipeline.

Every stage command takes ``--config PROFILE.yaml`` and any number of ``--set section.field=value``
overrides, and resumes: rerunning a finished stage does nothing, an interrupted one finishes.

Every error a user can cause ends as one line naming the cause and a non-zero exit (2 for a bad
config, 1 otherwise), for every command and every job entrypoint: ``UserErrors`` turns the
project's ``MegapairsError``s, and the storage failures a user causes (a missing path, no
permission, a full or read-only disk, missing credentials, an unreachable endpoint), into that
line, naming the operation and the path. A file missing under the run directory of the config
the command loaded (or a missing file the error does not name) is not the user's: the run wrote it
or was about to, so it is reported as an internal fault, in one line that says where its traceback
was written (``RUN/_logs/``). Anything else is a bug and keeps its traceback
(``MEGAPAIRS_TRACEBACK=1`` keeps it for every error).
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from megapairs_ray.config import ConfigT, RunConfig, load_config
from megapairs_ray.errors import MegapairsError
from megapairs_ray.pipeline.stages import STAGES, stage

console = Console(stderr=True)

# Storage failures a user causes, by errno: named in one line, not a traceback.
_USER_ERRNOS = {errno.ENOENT: "not found", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied", errno.ENOSPC: "no space left on device",
                errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded",
                errno.ENOTDIR: "not a directory", errno.EISDIR: "is a directory"}


# The run directories of the configs this command loaded: the files under them are the run's own.
_RUN_DIRS: list[str] = []


def _cause(e: BaseException) -> BaseException:
    return getattr(e, "cause", None) or e  # a Ray task's error: the exception it wraps


def _forms(path: str) -> set[str]:
    """The ways a path is written: without its scheme (s3fs reports s3 paths without it), and
    a local one also absolute."""
    bare = path.split("://", 1)[-1].rstrip("/")
    return {bare} if "://" in path else {bare, os.path.abspath(bare)}


def _run_owns(path: str) -> bool:
    """Whether ``path`` lies under a run directory this command loaded."""
    return any(p == d or p.startswith(d + "/")
               for p in _forms(path) for r in _RUN_DIRS for d in _forms(r))


def _errno(e: OSError) -> int | None:
    """The error's errno; s3fs raises ``FileNotFoundError(path)`` with none."""
    if e.errno is None and isinstance(e, FileNotFoundError):
        return errno.ENOENT
    return e.errno


def _storage_error(e: OSError) -> tuple[str, str | None, bool]:
    """(operation and path, the path, whether the user named it) of a storage failure, as far
    as the error tells (``storage.names_its_operation``)."""
    operation, uri, user_named = getattr(e, "megapairs_operation", ("", None, False))
    # s3fs's errno-less FileNotFoundError carries the path as its one argument.
    named = e.filename or (e.args[0] if e.errno is None and e.args else None)
    path = uri or (str(named) if named else None)
    return (f"{operation} {path}".strip() if path else ""), path, user_named


def is_internal_fault(e: BaseException) -> bool:
    """A missing file the run wrote or was about to write (or one the error does not name)."""
    e = _cause(e)
    if not isinstance(e, OSError) or _errno(e) != errno.ENOENT or isinstance(e, MegapairsError):
        return False
    _, path, user_named = _storage_error(e)
    return path is None or (_run_owns(path) and not user_named)


def user_error_message(e: BaseException) -> str | None:
    """The one line for an error the user caused, or None for a bug."""
    e = _cause(e)
    if isinstance(e, MegapairsError):
        return str(e)
    code = _errno(e) if isinstance(e, OSError) else None
    if code in _USER_ERRNOS and not is_internal_fault(e):
        where = _storage_error(e)[0]  # type: ignore[arg-type]
        return f"{_USER_ERRNOS[code]}: {where}" if where else \
            f"{_USER_ERRNOS[code]}: {getattr(e, 'strerror', None) or e}"
    module = type(e).__module__ or ""
    if module.startswith(("botocore", "aiobotocore")):  # credentials, endpoint, bucket
        return f"storage: {type(e).__name__}: {e}"
    return None


def report_internal_fault(e: BaseException) -> str:
    """Write ``e``'s traceback under the run directory (a temporary folder if that fails too)
    and return the one line that says it is an internal fault and where the traceback is."""
    cause = _cause(e)
    where = _storage_error(cause)[0] if isinstance(cause, OSError) else ""
    text = "".join(traceback.format_exception(e))
    name = f"internal-error-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.txt"
    from megapairs_ray.io import layout, storage

    written = None
    for uri in [*(layout.internal_error_file(r, name) for r in _RUN_DIRS),
                os.path.join(tempfile.gettempdir(), name)]:
        try:
            with storage.open_atomic(uri, "w") as f:
                f.write(text)
            written = uri
            break
        except OSError:
            continue
    missing = f"{where}: no such file" if where else f"{type(cause).__name__}: {cause}"
    return (f"internal fault, not a mistake in your input: {missing} (a file this run wrote or "
            f"was about to write is missing); traceback in {written or 'nowhere: unwritable'}; "
            "MEGAPAIRS_TRACEBACK=1 prints it")


class UserErrors(TyperGroup):
    """Runs a subcommand; a user-caused error becomes one line on stderr and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        _RUN_DIRS.clear()  # one command's configs (the tests invoke many in one process)
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:
            if os.environ.get("MEGAPAIRS_TRACEBACK"):
                raise  # asked for: the whole traceback
            if is_internal_fault(e):
                console.print(f"[red]error: {escape(report_internal_fault(e))}[/red]",
                              soft_wrap=True)
                raise typer.Exit(1) from None
            message = user_error_message(e)
            if message is None:
                raise  # a bug: the whole traceback
            first = message.strip().splitlines() or ["error"]
            console.print(f"[red]error: {escape(' '.join(line.strip() for line in first))}"
                          "[/red]", soft_wrap=True)
            cause = getattr(e, "cause", None) or e
            raise typer.Exit(getattr(cause, "exit_code", 1)) from None


app = typer.Typer(cls=UserErrors, no_args_is_help=True, add_completion=False,
                  help="MegaPairs data synthesis on Ray.")
corpus_app = typer.Typer(cls=UserErrors, no_args_is_help=True,
                         help="The bundled default corpus.")
app.add_typer(corpus_app, name="corpus")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Run config YAML (configs/).")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override a field: section.field=value (YAML value).")]


def _load(config: Path, overrides: list[str] | None,
          schema: type[ConfigT] = RunConfig,  # type: ignore[assignment]
          writes_run_dir: bool = True) -> ConfigT:
    """The config, validated; ``writes_run_dir``: its ``run_dir`` is where this command writes
    (a run's, a gallery's), not an input it only reads (the probe's finished run)."""
    cfg = load_config(config, overrides or [], schema=schema)
    run_dir = getattr(cfg, "run_dir", None)
    if writes_run_dir and isinstance(run_dir, str):
        _RUN_DIRS.append(run_dir)
    return cfg


def _preflight(cfg: RunConfig, stages: list[str]) -> None:
    """What can be checked before Ray starts: the run directory takes writes, the input exists
    and names shards, the models can be built."""
    from megapairs_ray.io import storage
    from megapairs_ray.io.shards import list_shards
    from megapairs_ray.models.encoders import check_models

    storage.check_writable(cfg.run_dir)
    if "ingest" in stages:
        list_shards(cfg.input)
    if "embed" in stages:
        check_models(cfg.embed.spaces)


def _run_stages(cfg: RunConfig, names: list[str]) -> None:
    from megapairs_ray.io.stepstate import run_lock
    from megapairs_ray.pipeline.engine import run_stage
    from megapairs_ray.runtime import init_ray

    chosen = [stage(n) for n in names]
    _preflight(cfg, names)
    with run_lock(cfg.run_dir):  # one driver per run directory; a second one refuses
        init_ray(cfg.ray)
        for st in chosen:
            console.print(f"[bold]{st.name}[/bold] → {escape(cfg.run_dir)}")
            record = run_stage(st, cfg)
            if record.inputs.get("changed"):
                console.print(f"  settings changed since the last run "
                              f"({escape(', '.join(record.inputs['changed']))}): recomputed")
            console.print(f"  done in {record.seconds:.1f}s: "
                          + ", ".join(f"{k}={v}" for k, v in sorted(record.counts.items())))
            if record.rejects:
                console.print("  rejects: " + ", ".join(f"{k}={v}" for k, v in
                                                        sorted(record.rejects.items())))


@app.command()
def run(config: ConfigOpt, set_: SetOpt = None,
        stages: Annotated[str | None, typer.Option(
            help="Comma-separated stages, in order (default: all the config has sections "
                 "for).")] = None) -> None:
    """Run the pipeline's stages, resuming whatever is already done."""
    cfg = _load(config, set_)
    if stages is None:
        synth = cfg.describe is not None and cfg.instruct is not None
        chosen = [s.name for s in STAGES if synth or s.section is None]
    else:
        chosen = [stage(s.strip()).name for s in stages.split(",") if s.strip()]
    _run_stages(cfg, chosen)
    show_manifest(cfg.run_dir)


def _stage_command(name: str) -> Any:
    """``megapairs <stage>``: one command per stage of the registry."""

    def command(config: ConfigOpt, set_: SetOpt = None) -> None:
        _run_stages(_load(config, set_), [name])

    return command


for _stage in STAGES:
    app.command(_stage.name, help=_stage.help)(_stage_command(_stage.name))


Num = Annotated[str | None, typer.Option(help="A number.")]


@app.command("plan")
def plan_cmd(
    images: Annotated[str | None, typer.Option(help="Images in the corpus: 1e9, 500M, 2B.")] = None,
    gpu: Annotated[str, typer.Option(help="GPU with measured results (a folder of --results).")
                   ] = "h200",
    nodes: Num = None, gpus_per_node: Num = None, cpus_per_node: Num = None,
    memory_per_node_gib: Num = None, cpu_nodes: Num = None, cpus_per_cpu_node: Num = None,
    memory_per_cpu_node_gib: Num = None, query_fraction: Num = None, pairs_per_query: Num = None,
    hard_negatives: Num = None, instructions_per_pair: Num = None,
    assume: Annotated[list[str] | None, typer.Option(
        help="Replace an assumption: NAME=VALUE (image_kb, caption_chars, export_image_kb, "
             "description_chars, instruction_chars, describe_pairs_per_gpu_s, "
             "instruct_pairs_per_gpu_s).")] = None,
    config: Annotated[Path, typer.Option("--config", "-c", help="Run config YAML.")] = Path(
        "configs/paper.yaml"),
    set_: SetOpt = None,
    train_config: Annotated[str, typer.Option(
        help="Training config YAML, or 'none' to leave training out.")
    ] = "configs/train-paper.yaml",
    results: Annotated[Path | None, typer.Option(
        help="Measured results folder (<machine>/<file>, as benchmarks/results/); default: the "
             "results shipped in the package.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Plan a run: GPU- and core-hours, nodes and wall time per stage, index memory, object
    store and storage, each figure with its source (a measured result file or an assumption)."""
    import json

    from megapairs_ray import plan
    from megapairs_ray.config import ConfigError
    from megapairs_ray.train.config import TrainConfig

    if images is None:
        raise ConfigError("--images is required (e.g. --images 1e9)")
    values: dict[str, Any] = {
        "images": images, "gpu": gpu, "nodes": nodes, "gpus_per_node": gpus_per_node,
        "cpus_per_node": cpus_per_node, "memory_per_node_gib": memory_per_node_gib,
        "cpu_nodes": cpu_nodes, "cpus_per_cpu_node": cpus_per_cpu_node,
        "memory_per_cpu_node_gib": memory_per_cpu_node_gib, "query_fraction": query_fraction,
        "pairs_per_query": pairs_per_query, "hard_negatives": hard_negatives,
        "instructions_per_pair": instructions_per_pair}
    for item in assume or []:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in plan.ASSUMPTION_FIELDS:
            raise ConfigError(f"--assume {item!r}: use NAME=VALUE with NAME one of "
                              f"{', '.join(plan.ASSUMPTION_FIELDS)}")
        values[name] = value.strip()
    inputs = plan.plan_inputs(values)
    cfg = _load(config, set_)
    train = None if train_config.lower() == "none" else load_config(train_config,
                                                                    schema=TrainConfig)
    result = plan.make_plan(inputs, cfg, train, results, str(config), train_config)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=1))
    else:
        plan.render(result, Console())


@app.command("config")
def show_config(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Validate a config and print it with every default filled in."""
    import yaml

    typer.echo(yaml.safe_dump(_load(config, set_).model_dump(mode="json"), sort_keys=False))


@app.command("manifest")
def show_manifest(run_dir: Annotated[str, typer.Argument(help="Run directory.")]) -> None:
    """Print what each stage of a run consumed, produced, counted and rejected."""
    from megapairs_ray import manifest

    doc = manifest.load(run_dir)
    table = Table(title=f"run {run_dir}")
    for col in ("stage", "seconds", "counts", "rejects"):
        table.add_column(col)
    for name, st in doc.get("stages", {}).items():
        table.add_row(name, f"{st['seconds']:.1f}",
                      "\n".join(f"{k}: {v}" for k, v in st["counts"].items()),
                      "\n".join(f"{k}: {v}" for k, v in st["rejects"].items()) or "-")
    Console().print(table)


@app.command()
def train(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Train MMRet on MegaPairs-form triplets, or align a towers retriever on a run's captions,
    with Ray Train (resumes a relaunched run)."""
    from megapairs_ray.train.config import TrainConfig
    from megapairs_ray.train.trainer import run_training

    summary = run_training(_load(config, set_, TrainConfig))
    console.print(f"trained to step {summary['metrics'].get('step')}: "
                  f"loss {summary['metrics'].get('loss'):.4f}; checkpoint {summary['checkpoint']}")
    what = "captioned images" if summary.get("captions") else "triplets"
    console.print(f"{what}: " + ", ".join(f"{k}={v}" for k, v in summary["triplets"].items()))


@app.command()
def probe(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Does this run's data train a better retriever? Held-out images, four retrievers per seed
    (untrained, aligned, aligned + MMRet, shuffled-target control), the project's metrics."""
    from megapairs_ray.train.probe import ProbeConfig, rows_of, run_probe

    cfg = _load(config, set_, ProbeConfig, writes_run_dir=False)
    report = run_probe(cfg, log=console.print)
    rows = rows_of(report)
    table = Table(title=f"data probe of {cfg.run_dir}: {report['held_out_triplets']} held-out "
                        f"triplets, {report['held_out_images']} images, seeds {cfg.seeds}")
    for col in rows[0]:
        table.add_column(col)
    for row in rows[1:]:
        table.add_row(*row)
    Console().print(table)
    console.print(f"report: {cfg.out}/probe.json")


@app.command("train-toy-data")
def train_toy_data(
    out: Annotated[Path, typer.Option(help="Folder for images and train.jsonl.")] = Path(
        "data/toy-triplets"),
) -> None:
    """Write the toy triplet set (coloured shapes) that configs/train-tiny.yaml trains on."""
    from megapairs_ray.train.toy_triplets import write_toy_dataset

    path = write_toy_dataset(out)
    console.print(f"toy triplets: {path}")


@app.command("eval")
def evaluate(
    checkpoint: Annotated[str, typer.Option(help="A checkpoint of either family (its "
                                                 "config.json says which) or a hub id.")],
    benchmark: Annotated[str, typer.Option(help="circo, cirr, fashioniq, genecis or mmeb.")],
    data: Annotated[str, typer.Option(help="The benchmark's folder (local or s3://).")],
    split: Annotated[str | None, typer.Option(help="Default: val (CIR benchmarks), test "
                                                   "(MMEB).")] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32 or bf16.")] = "fp32",
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    out: Annotated[str | None, typer.Option(help="Write the report as JSON here.")] = None,
    gpus: Annotated[float, typer.Option(help="Run on a Ray cluster node with this many "
                                        "GPUs (0 and --cpus 0: in this process); MMEB: "
                                        "each embedding actor's GPUs (with --device "
                                        "cuda).")] = 0,
    cpus: Annotated[float, typer.Option(help="Run on a Ray cluster node with this many "
                                        "CPUs (0: 1 if --gpus is set); MMEB: each embedding "
                                        "actor's CPUs (0: 1).")] = 0,
    images: Annotated[str | None, typer.Option(help="MMEB: the unpacked images folder "
                                               "(default: DATA/eval_images).")] = None,
    datasets: Annotated[str | None, typer.Option(help="MMEB: comma-separated dataset "
                                                 "names (default: every folder).")] = None,
    work: Annotated[str | None, typer.Option(help="MMEB: keep each finished dataset's "
                                             "result here; a rerun recomputes nothing "
                                             "finished (default: OUT.parts with --out).")] = None,
    actors: Annotated[int, typer.Option(min=1, help="MMEB: most embedding actors.")] = 1,
) -> None:
    """Zero-shot metrics of a checkpoint (a folder of either retriever family, local or s3://,
    a hub id, or a `megapairs train` run folder: its last checkpoint): the four
    composed-image-retrieval benchmarks, or MMEB's 36 datasets."""
    from megapairs_ray.io import storage
    from megapairs_ray.models.retriever import resolve_checkpoint

    if benchmark == "mmeb":
        _evaluate_mmeb(resolve_checkpoint(checkpoint), data, split or "test", images,
                       datasets, work or (f"{out}.parts" if out else None), out, device,
                       precision, batch_size, gpus, cpus, actors)
        return
    from megapairs_ray.train.evaluate import run_eval

    kwargs = {"checkpoint": resolve_checkpoint(checkpoint), "benchmark": benchmark,
              "root": data, "split": split or "val", "device": device,
              "batch_size": batch_size, "precision": precision}
    if gpus > 0 or cpus > 0:
        # On a cluster the driver sits on the head, which takes no work: the evaluation goes
        # to a worker node with the resources asked for.
        import ray

        from megapairs_ray.config import RayConfig
        from megapairs_ray.runtime import init_ray

        init_ray(RayConfig())
        task = ray.remote(num_gpus=gpus, num_cpus=cpus or 1)(run_eval)
        report = ray.get(task.remote(**kwargs))
    else:
        report = run_eval(**kwargs)
    for r in report["results"]:
        table = Table(title=f"{r['benchmark']}: {r['queries']} queries, {r['gallery']} images")
        for k in r["metrics"]:
            table.add_column(k)
        table.add_row(*(f"{v:.2f}" for v in r["metrics"].values()))
        Console().print(table)
    if "mean" in report:
        console.print("mean: " + ", ".join(f"{k}={v:.2f}" for k, v in report["mean"].items()))
    if out:
        storage.write_json(out, report)


def _evaluate_mmeb(checkpoint: str, data: str, split: str, images: str | None,
                   datasets: str | None, work: str | None, out: str | None, device: str,
                   precision: str, batch_size: int, gpus: float, cpus: float,
                   actors: int) -> None:
    """MMEB on Ray Data actor pools: a table per dataset, then the aggregates."""
    from megapairs_ray.config import RayConfig
    from megapairs_ray.io import storage
    from megapairs_ray.runtime import init_ray
    from megapairs_ray.train.mmeb import METRIC, EncoderSettings, run_mmeb

    init_ray(RayConfig())
    enc = EncoderSettings(device=device, precision=precision, batch_size=batch_size,
                          num_gpus=gpus, num_cpus=cpus or 1, max_actors=actors)
    names = [d.strip() for d in datasets.split(",") if d.strip()] if datasets else None
    report = run_mmeb(checkpoint, data, images, split, names, work, enc, log=console.print)
    table = Table(title=f"MMEB {split}: {report['datasets']} datasets, {METRIC}")
    for col in ("dataset", "meta-task", "split", "rows", METRIC, "problems"):
        table.add_column(col)
    for r in report["results"]:
        p1 = r["metrics"][METRIC]
        table.add_row(r["benchmark"], r["meta_task"], r["distribution"], str(r["queries"]),
                      "-" if p1 is None else f"{p1:.2f}",
                      ", ".join(f"{k}={v}" for k, v in r["problems"].items()))
    Console().print(table)
    means = Table(title="MMEB means over the datasets scored")
    for k in report["mean"]:
        means.add_column(k)
    means.add_row(*(f"{v:.2f}" for v in report["mean"].values()))
    Console().print(means)
    if out:
        storage.write_json(out, report)


@app.command()
def gallery(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Embed a gallery with a retriever checkpoint and index it, for `megapairs serve`."""
    from megapairs_ray.pipeline.gallery import run_gallery
    from megapairs_ray.runtime import init_ray
    from megapairs_ray.serve.config import GalleryConfig

    cfg = _load(config, set_, GalleryConfig)
    init_ray(cfg.ray)
    record = run_gallery(cfg)
    console.print(f"gallery {cfg.run_dir}: " + ", ".join(
        f"{k}={v}" for k, v in sorted(record.counts.items())))
    if record.rejects:
        console.print("  rejects: " + ", ".join(f"{k}={v}" for k, v in
                                                sorted(record.rejects.items())))


@app.command("serve")
def serve_cmd(
    config: Annotated[Path, typer.Option("--config", "-c", help="Ray Serve config file "
                                         "(configs/serve-*.yaml).")],
    host: Annotated[str | None, typer.Option(help="Override http_options.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Override http_options.port.")] = None,
    detach: Annotated[bool, typer.Option(help="Return once deployed (on a cluster, Serve "
                                         "keeps running).")] = False,
    fast_path: Annotated[str, typer.Option(
        help="Ray Serve's fast path for the Ray this command starts: haproxy (the default: "
             "HAProxy ingress + direct ingress, measured fastest), throughput (direct ingress "
             "alone) or off. A running cluster keeps its own (its containers' environment).",
    )] = "haproxy",
) -> None:
    """Serve the retriever: the search page, /search, /embed, /images, /healthz."""
    import os
    import time

    from megapairs_ray.serve.deploy import use_fast_path

    # First: Serve reads the switches when it is imported (the config check imports it).
    use_fast_path(fast_path)
    if os.environ.get("RAY_ADDRESS"):
        console.print("joining the cluster at RAY_ADDRESS: its own fast-path settings apply")
    elif fast_path == "haproxy":
        console.print("fast path haproxy: HAProxy's stats (8404) and metrics (9101) listen on "
                      "every interface (docs/serving.md); --fast-path off binds only "
                      "http_options.host")

    from megapairs_ray.config import RayConfig
    from megapairs_ray.runtime import init_ray
    from megapairs_ray.serve.config import load_serve_file
    from megapairs_ray.serve.deploy import deploy
    from megapairs_ray.serve.gallery import read_gallery

    # Every mistake the file can hold is found before Ray starts.
    for app_cfg in load_serve_file(config)[2].values():
        read_gallery(app_cfg.gallery_dir)
    init_ray(RayConfig())
    urls = deploy(config, host=host, port=port)
    for url in urls:
        console.print(f"serving: [bold]{url}[/bold]  (search page; API docs at {url}docs)")
    if detach:
        return
    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


@corpus_app.command("build")
def corpus_build(
    out: Annotated[Path, typer.Option(help="Folder for the webdataset shards.")] = Path(
        "data/corpus"),
    n_images: Annotated[int, typer.Option(min=1)] = 1000,
    shard_size: Annotated[int, typer.Option(min=1)] = 100,
) -> None:
    """Build the bundled corpus from Debian's OpenClipArt packages."""
    from megapairs_ray.corpus import build_corpus

    summary = build_corpus(out, n_images=n_images, shard_size=shard_size)
    console.print(f"corpus: {summary['n_images']} images in {summary['shards']} shards at {out}")


def main() -> None:
    """The installed ``megapairs`` command."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
