"""clip-retrieval's ``clip back`` on the same 1,000 images, loaded by the same client.

clip-retrieval 2.45 lives in its own venv (``--clipback-venv``; it pins its own transformers,
numpy and open_clip). Made once, offline:

    python3.11 -m venv data/bench/clipback-venv
    data/bench/clipback-venv/bin/pip install clip-retrieval==2.45.0 torch==2.13.0 \
        torchvision==0.28.0 "setuptools<81"   # a newer torchvision pulls a CUDA torch;
                                   # clip (clip-anytorch) imports pkg_resources

(and, as in the project's own venv, the start-up hook that lets PyPI's CUDA-linked torchvision
import beside the CPU torch: ``tv_hook`` copies it over when ``import torchvision`` fails).

There is no model hub here, so ``clip back`` gets a random-initialised open_clip model of the
megapairs benchmark's size (``serve_load.CLIP_CFG``: ViT 6 x 384, 224 px / patch 32; text
4 x 256, 77 tokens; embedding 256): its config is added to the venv's open_clip
``model_configs`` as ``mpbench-vit``, and the random weights (torch seed 0) are saved to a file
that ``--clip_model open_clip:mpbench-vit/<file>`` names — clip-retrieval's own loader then
reads them as a local checkpoint; nothing in clip-retrieval is patched except ``clip back``'s
bind address (it hard-codes 0.0.0.0; here ``Flask.run`` is made to bind 127.0.0.1).
The hub-backed extras are off: ``--enable_mclip_option False`` (M-CLIP from the hub),
``--provide_aesthetic_embeddings False`` (downloads from GitHub), no safety model or violence
detector.

Steps: the corpus's images extracted to files (clip inference's webdataset reader
takes one image extension; a tenth of the corpus is PNG) -> ``clip-retrieval inference``
-> ``clip-retrieval index`` (autofaiss) -> ``clip back`` on 127.0.0.1 -> closed-loop load on
``POST /knn-service`` with the image-only and text-only queries of the serve benchmark's mix
(clip back has no composed query), through ``serve_client.py``. For the same payloads the
megapairs service's clip-retrieval-compatible ``/knn-service`` facade is what to compare with
(``serve_load.py`` runs it).

    .venv/bin/python benchmarks/serve_clipback.py --levels 1,8,32,64 \
        --out benchmarks/results/cpu-2core/serve_clipback.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import serve_load  # noqa: E402  (the shared client runner, queries and model size)

MODEL = "mpbench-vit"
INDEX_NAME = serve_load.KNN_INDEX_NAME
COLUMNS = ["caption"]


def open_clip_config() -> dict[str, Any]:
    v, t = serve_load.CLIP_CFG["vision_config"], serve_load.CLIP_CFG["text_config"]
    return {"embed_dim": serve_load.CLIP_CFG["projection_dim"],
            "quick_gelu": True,  # HF CLIPConfig's default activation
            "vision_cfg": {"image_size": v["image_size"], "layers": v["num_hidden_layers"],
                           "width": v["hidden_size"], "patch_size": v["patch_size"],
                           "head_width": v["hidden_size"] // v["num_attention_heads"],
                           "mlp_ratio": v["intermediate_size"] / v["hidden_size"]},
            "text_cfg": {"context_length": t["max_position_embeddings"],
                         "vocab_size": t["vocab_size"], "width": t["hidden_size"],
                         "heads": t["num_attention_heads"], "layers": t["num_hidden_layers"],
                         "mlp_ratio": t["intermediate_size"] / t["hidden_size"]}}


class StepFailed(RuntimeError):
    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step, self.detail = step, detail


def sh(step: str, cmd: list[str], log: Path, timeout: float, **kw: Any) -> None:
    print(f"clipback: {step}: {' '.join(cmd)[:200]}", flush=True)
    with open(log, "w") as f:
        try:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, **kw)
        except subprocess.TimeoutExpired:
            raise StepFailed(step, f"timed out after {timeout} s; log {log}") from None
    if r.returncode != 0:
        tail = log.read_text()[-2500:]
        raise StepFailed(step, f"exit {r.returncode}; log {log}; last output:\n{tail}")


NOTES = [
    "Model: no hub here, so a random-initialised open_clip model of the service's size "
    "(config 'mpbench-vit' added to the venv's open_clip model_configs; weights saved with "
    "torch seed 0 and named as a local checkpoint in --clip_model open_clip:mpbench-vit/<file>). "
    "Same shapes as the service's model, not the same weights: the rankings differ, the cost "
    "per query is what is compared.",
    "clip back hard-codes host 0.0.0.0; Flask.run is wrapped to bind 127.0.0.1. Nothing else "
    "in clip-retrieval is patched. Hub-backed extras off: enable_mclip_option, "
    "provide_aesthetic_embeddings, safety model, violence detector. use_jit False.",
    "Install: torch==2.13.0 (the local CPU build) and torchvision==0.28.0 pinned, or pip pulls "
    "a CUDA torch; setuptools<81 (clip-anytorch imports pkg_resources); the project's start-up "
    "hook for PyPI's CUDA-linked torchvision beside a CPU torch copied into the venv.",
    "Index input: the corpus's 1,000 images as files (the webdataset reader takes one image "
    "extension, 'jpg'; 100 of the images are PNG). Images only: 2.45's files reader keys files "
    "by name with extension, so --enable_text True fails (KeyError '000000000.txt'); captions "
    "are added to the index metadata from the corpus's .txt files afterwards.",
    "columns_to_return ['caption']: with image_path returned, clip back reads each hit's whole "
    "image and inlines it as base64 JPEG (500 on RGBA PNGs).",
    "clip back serves with Flask's threaded development server (app.run), one thread per "
    "request, torch's default intra-op threads (the 2 cores), no batching. The index is the one "
    "autofaiss picks (index_infos.index_key: HNSW15 for these 1,000 vectors; the service's "
    "is flat; either searches 1,000 vectors in well under a millisecond).",
    "Its requests: the serve mix's image-only and text-only queries (no composed query in "
    "clip back), the same JSON bodies the service's /knn-service facade is loaded with.",
]


def tv_hook(venv: Path) -> None:
    """PyPI's torchvision is linked against CUDA torch; beside the CPU torch its operators do
    not load and ``import torchvision`` fails (``operator torchvision::nms does not exist``).
    The project's venv has a start-up hook for that (scripts/setup.sh installs it); the same
    hook goes into clip-retrieval's venv when the plain import fails there too."""
    py = str(venv / "bin" / "python")
    if subprocess.run([py, "-c", "import torchvision"], capture_output=True).returncode == 0:
        return
    import sysconfig

    here = Path(sysconfig.get_paths()["purelib"])
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for name in ("_megapairs_torchvision_cpu_ops.py", "_megapairs_torchvision_cpu_ops.pth"):
        if not (here / name).exists():
            raise StepFailed("import torchvision", f"fails in {venv}, and {here / name} (the "
                             "project's hook for it) is missing")
        (Path(site) / name).write_bytes((here / name).read_bytes())


def extract_corpus(corpus: Path, folder: Path) -> Path:
    """The corpus's images (jpg and png) as files: clip inference's webdataset reader takes one
    image extension, and a tenth of the corpus is PNG."""
    import tarfile

    if (folder / "_complete").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for tar in sorted(corpus.glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.isfile() and m.name.rsplit(".", 1)[-1] in ("jpg", "png"):
                    (folder / Path(m.name).name).write_bytes(t.extractfile(m).read())
    (folder / "_complete").touch()
    return folder


def add_captions(metadata: Path, corpus: Path) -> None:
    """A caption column in the index's metadata (from the corpus's .txt files, by key), so a
    clip back hit carries its caption as the service's does: 2.45's files reader cannot read
    captions beside images (see the inference step)."""
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    captions: dict[str, str] = {}
    for tar in sorted(corpus.glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.isfile() and m.name.endswith(".txt"):
                    captions[Path(m.name).stem] = t.extractfile(m).read().decode()
    for part in sorted(metadata.glob("*.parquet")):
        table = pq.read_table(part)
        if "caption" in table.column_names:
            continue
        keys = [Path(p).stem for p in table.column("image_path").to_pylist()]
        pq.write_table(table.append_column("caption", pa.array([captions.get(k) for k in keys],
                                                               pa.string())), part)


def prepare(venv: Path, work: Path, corpus: Path) -> tuple[str, Path]:
    """(the --clip_model string, the indices json); cached under ``work``."""
    py = str(venv / "bin" / "python")
    if not Path(py).exists():
        raise StepFailed("venv", f"no {py}: make the venv (see this file's docstring)")
    work.mkdir(parents=True, exist_ok=True)
    tv_hook(venv)
    cfg_dir = subprocess.run(
        [py, "-c", "import open_clip, os; print(os.path.join(os.path.dirname("
                   "open_clip.__file__), 'model_configs'))"],
        capture_output=True, text=True)
    if cfg_dir.returncode != 0:
        raise StepFailed("import open_clip", cfg_dir.stderr[-2000:])
    (Path(cfg_dir.stdout.strip()) / f"{MODEL}.json").write_text(
        json.dumps(open_clip_config(), indent=1))
    weights = work / f"{MODEL}-random-seed0.pt"
    if not weights.exists():
        sh("random open_clip weights",
           [py, "-c", "import sys, torch, open_clip; torch.manual_seed(0); "
                      f"m = open_clip.create_model({MODEL!r}, pretrained=None); "
                      "torch.save(m.state_dict(), sys.argv[1]); "
                      "print(sum(p.numel() for p in m.parameters()), 'parameters')",
            str(weights)], work / "weights.log", 600)
    clip_model = f"open_clip:{MODEL}/{weights}"
    emb, idx = work / "embeddings", work / "index"
    files = extract_corpus(corpus, work / "files")
    cli = str(venv / "bin" / "clip-retrieval")
    if not (emb / "img_emb").exists() or not any((emb / "img_emb").iterdir()):
        t0 = time.perf_counter()
        sh("clip inference", [cli, "inference", "--input_dataset", str(files),
                              "--output_folder", str(emb), "--input_format", "files",
                              # images only: 2.45's files reader keys files by name *with*
                              # extension, so text + image never pair up (KeyError 'x.txt')
                              "--enable_text", "False", "--enable_metadata", "False",
                              "--clip_model", clip_model, "--use_jit", "False",
                              "--batch_size", "64", "--num_prepro_workers", "2"],
           work / "inference.log", 900)
        print(f"clipback: inference took {time.perf_counter() - t0:.0f} s", flush=True)
    if not (idx / "image.index").exists():
        sh("clip index", [cli, "index", "--embeddings_folder", str(emb), "--index_folder",
                          str(idx), "--max_index_memory_usage", "1G",
                          "--current_memory_available", "4G", "--nb_cores", "2"],
           work / "index.log", 1800)
    add_captions(idx / "metadata", corpus)
    indices = work / "indices_paths.json"
    indices.write_text(json.dumps({INDEX_NAME: str(idx)}))
    return clip_model, indices


BOOT = ("import flask, fire; run = flask.Flask.run; "
        "flask.Flask.run = lambda self, host=None, port=None, **kw: "
        "run(self, host='127.0.0.1', port=port, **kw); "
        "from clip_retrieval.clip_back import clip_back; fire.Fire(clip_back)")


def start_back(venv: Path, clip_model: str, indices: Path, port: int, log: Path,
               ) -> subprocess.Popen:
    cmd = [str(venv / "bin" / "python"), "-c", BOOT, "--indices_paths", str(indices),
           "--port", str(port), "--clip_model", clip_model, "--use_jit", "False",
           "--enable_mclip_option", "False", "--provide_aesthetic_embeddings", "False",
           "--provide_safety_model", "False", "--provide_violence_detector", "False",
           "--enable_faiss_memory_mapping", "False",
           # Not image_path: with it (the files format's metadata) clip back reads every hit's
           # whole image from disk and inlines it as base64 JPEG (and fails, 500, on RGBA
           # PNGs). A hit is its id, similarity and caption, as the service's (which links a
           # thumbnail instead of inlining an image).
           "--columns_to_return", json.dumps(COLUMNS)]
    print(f"clipback: clip back on 127.0.0.1:{port}", flush=True)
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_up(proc: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise StepFailed("clip back start", f"exited {proc.returncode}; last output:\n"
                             f"{log.read_text()[-2500:]}")
        try:
            with urllib.request.urlopen(url + "/indices-list", timeout=5) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except Exception:  # not up yet
            pass
        time.sleep(1)
    raise StepFailed("clip back start", f"no answer on {url}/indices-list after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: clip back and nothing else
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def run(queries: list[dict[str, Any]], args: argparse.Namespace, workdir: Path,
        root: Path = ROOT) -> dict[str, Any]:
    """clip back's levels, or why it did not run (the step and its error)."""
    venv = Path(args.clipback_venv)
    work = Path(args.cache).resolve() / "clipback"
    out: dict[str, Any] = {"tool": "clip-retrieval 2.45.0 clip back (Flask, threaded)",
                           "venv": str(venv), "notes": NOTES}
    proc = None
    try:
        versions = subprocess.run(
            [str(venv / "bin" / "python"), "-c",
             "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
             "['clip-retrieval', 'torch', 'open_clip_torch', 'faiss-cpu', 'autofaiss', "
             "'flask', 'numpy']}))"], capture_output=True, text=True)
        out["versions"] = json.loads(versions.stdout) if versions.returncode == 0 else None
        clip_model, indices = prepare(venv, work, root / "data" / "corpus")
        out["model"] = {"open_clip_config": open_clip_config(), "weights": "random, seed 0",
                        "clip_model_arg": clip_model}
        idx_info = work / "index" / "image.json"
        if idx_info.exists():
            out["index_infos"] = json.loads(idx_info.read_text())
        port = serve_load.free_port()
        log = work / "clip-back.log"
        proc = start_back(venv, clip_model, indices, port, log)
        url = f"http://127.0.0.1:{port}"
        out["start_to_ready_s"] = round(wait_up(proc, url, log), 1)
        payloads = serve_load.knn_payloads(queries)
        for p in payloads[:2]:  # one image and one text query, answers checked
            status, body = serve_load.http_json(url + p["path"], p["body"].encode())
            if status != 200 or len(body) != serve_load.TOP_K:
                raise StepFailed("clip back preflight",
                                 f"{p['kind']}: {status} {str(body)[:300]}")
        pfile = workdir / "payloads-knn.json"
        pfile.write_text(json.dumps(payloads))
        out["queries"] = f"{len(payloads)} distinct (image-only and text-only of the mix)"
        out["levels"] = [serve_load.run_level(url, str(pfile), int(u), args, args.client,
                                              workdir, "clipback")
                         for u in args.levels.split(",")]
    except StepFailed as e:
        out.update({"ran": False, "failed_step": e.step, "error": e.detail})
        print(f"clipback: FAILED at {e.step}: {e.detail[-1500:]}", flush=True)
    except Exception as e:  # recorded: the serve results still get written
        out.update({"ran": False, "failed_step": "unexpected", "error":
                    "".join(traceback.format_exception(e))[-3000:]})
        print(f"clipback: FAILED: {e}", flush=True)
    else:
        out["ran"] = True
    finally:
        if proc is not None:
            stop(proc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=str(ROOT / "data" / "bench" / "serve"))
    ap.add_argument("--clipback-venv", default=str(ROOT / "data" / "bench" / "clipback-venv"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-2core" /
                                         "serve_clipback.json"))
    ap.add_argument("--levels", default="1,8,32,64")
    ap.add_argument("--queries", type=int, default=48)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--max-requests", type=int, default=3000)
    ap.add_argument("--client", choices=["locust", "httpx"], default="locust")
    args = ap.parse_args()
    workdir = Path(args.cache).resolve() / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    res = run(serve_load.make_queries(args.queries), args, workdir)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
