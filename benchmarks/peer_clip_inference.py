"""clip-retrieval's ``clip inference`` vs our embed stage: one open_clip image encoder, same shards.

Peer: clip-retrieval 2.45 (``clip-retrieval inference``), in its own venv (its pins clash with
ours), made once, offline:

    python3.11 -m venv $PEERS_VENV
    $PEERS_VENV/bin/pip install clip-retrieval==2.45.0 autofaiss==2.18.0 torch==2.13.0 \\
        torchvision==0.28.0 "setuptools<81"

(torch 2.13.0 is the local CPU build; torchvision 0.28.0 is PyPI's CUDA-linked one, which imports
beside the CPU torch through the project's start-up hook: ``serve_clipback.tv_hook`` copies it
into the peers venv when the plain import fails there.) ``--peers-venv`` or ``$PEERS_VENV``
names it (default ``data/bench/peers-venv``).

The same model on both sides: open_clip ViT-B-32 with random weights (torch seed 0; no model hub
here), saved once to a state-dict file that both load as a local checkpoint — clip-retrieval
through ``--clip_model open_clip:ViT-B-32/<file>`` (all_clip's loader passes the part after the
first ``/`` to open_clip as ``pretrained``), ours through ``encoder.pretrained: <file>``. fp32 on
both (clip-retrieval's open_clip wrapper runs fp32 on a CPU). The same webdataset shards
(synthetic JPEGs 512x384 / 384x512 / 512x512, a caption each), image embeddings only (theirs
``--enable_text False``; ours one ``open_clip_image`` space), the same batch size.

Each side runs as a fresh process from its command line, one after the other, timed end to end
(process start, imports, model load, and for ours Ray's start-up included) with the CPU seconds
of its whole process tree (sampled with psutil; the machine is shared, and CPU seconds per image
are what another tenant disturbs least). Ours also reports the embed stage's own seconds from the
run manifest, and ingest (which clip inference has no counterpart for: it gates every record)
is run and reported apart. The two outputs are checked against each other: per image, the cosine
of our vector and theirs (same weights, so ~1; the resize implementations differ slightly).

A breakdown per batch (decode / preprocess / forward) of both paths on the same JPEGs says where
the time goes.

    .venv/bin/python benchmarks/peer_clip_inference.py --images 1000 \\
        --out benchmarks/results/cpu-2core/peer_clip_inference.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

MODEL = "ViT-B-32"
SIZES = [(512, 384), (384, 512), (512, 512)]
SPACE = "clip_image"


def default_peers_venv() -> str:
    return os.environ.get("PEERS_VENV", str(ROOT / "data" / "bench" / "peers-venv"))


def synthetic_jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A photo-like JPEG (q90): a colour gradient, shapes, a blur, sensor-like noise."""
    a, b = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    t = np.linspace(0, 1, w)[None, :, None]
    base = (a * (1 - t) + b * t).repeat(h, axis=0).astype(np.uint8)
    im = Image.fromarray(base)
    d = ImageDraw.Draw(im)
    for _ in range(8):
        x, y = (int(v) for v in rng.integers(0, min(w, h), 2))
        r = int(rng.integers(10, 120))
        fill = tuple(int(c) for c in rng.integers(0, 255, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((x, y, x + r, y + r), fill=fill)
    im = im.filter(ImageFilter.GaussianBlur(1.5))
    px = np.asarray(im).astype(np.int16) + rng.normal(0, 8, (h, w, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def build_shards(folder: Path, n: int, shard_size: int, seed: int = 0) -> list[Path]:
    """``n`` samples (``KEY.jpg`` + ``KEY.txt``) in tars of ``shard_size``; cached."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = [folder / f"{s // shard_size:05d}.tar" for s in range(0, n, shard_size)]
    if (folder / f"_done-{n}-{shard_size}").exists():
        return shards
    rng = np.random.default_rng(seed)
    for s, path in zip(range(0, n, shard_size), shards):
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(n, s + shard_size)):
                w, h = SIZES[i % len(SIZES)]
                caption = f"synthetic picture {i}".encode()
                for ext, data in (("jpg", synthetic_jpeg(rng, w, h)), ("txt", caption)):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (folder / f"_done-{n}-{shard_size}").touch()
    return shards


def save_weights(path: Path) -> None:
    """Random ViT-B-32 weights, torch seed 0, as a state dict both sides load."""
    if path.exists():
        return
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, pretrained=None)
    torch.save(model.state_dict(), path)


class TreeCPU:
    """CPU seconds of a process and its descendants, sampled every ``period`` seconds (a process
    that ends between samples loses at most its last period)."""

    def __init__(self, pid: int, period: float = 0.25) -> None:
        self.pid, self.period = pid, period
        self.seen: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                with p.oneshot():
                    c = p.cpu_times()
                    self.seen[(p.pid, p.create_time())] = c.user + c.system
            except psutil.Error:
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)

    def stop(self) -> float:
        self._sample()
        self._stop.set()
        self._thread.join()
        return sum(self.seen.values())


def timed_run(cmd: list[str], log: Path, env: dict[str, str] | None = None,
              timeout: float = 900) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, CPU seconds of its process tree, load average before/after."""
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        meter = TreeCPU(proc.pid)
        try:
            rc = proc.wait(timeout)
        finally:
            cpu = meter.stop()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{cmd[:3]} exited {rc}; log {log}:\n{log.read_text()[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 1),
            "loadavg_1m_before_after": [round(load0[0], 2), round(os.getloadavg()[0], 2)]}


def theirs_cmd(venv: Path, shards: list[Path], out: Path, weights: Path, batch: int,
               workers: int) -> list[str]:
    first, last = shards[0].stem, shards[-1].stem
    spec = str(shards[0].parent / f"{{{first}..{last}}}.tar") if len(shards) > 1 \
        else str(shards[0])
    return [str(venv / "bin" / "clip-retrieval"), "inference", "--input_dataset", spec,
            "--input_format", "webdataset", "--output_folder", str(out),
            "--enable_text", "False", "--enable_metadata", "False",
            "--wds_image_key", "jpg", "--wds_caption_key", "txt",
            "--clip_model", f"open_clip:{MODEL}/{weights}", "--use_jit", "False",
            "--batch_size", str(batch), "--num_prepro_workers", str(workers)]


def our_config(shards: list[Path], run_dir: Path, weights: Path, batch: int, embed_cpus: int,
               ) -> dict[str, Any]:
    """configs/tiny.yaml with one space (ViT-B-32's image tower, the shared weights) and the
    two cores given to the encoder actor (``embed.num_cpus`` = its torch threads; Ray's logical
    CPUs raised by one so the shard readers and writers still get scheduled beside it)."""
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["run_dir"] = str(run_dir)
    cfg["input"] = {"uris": [str(s) for s in shards], "format": "webdataset"}
    cfg["embed"].update({
        "spaces": [{"name": SPACE, "window": [0.8, 0.96],
                    "encoder": {"kind": "open_clip_image", "model": MODEL,
                                "pretrained": str(weights)}}],
        "batch_size": batch, "num_cpus": embed_cpus, "decode_threads": 2})
    cfg["ray"]["num_cpus"] = embed_cpus + 1
    for section in ("index", "mine", "describe", "instruct", "export"):
        cfg.pop(section, None)
    return cfg


def their_embeddings(out: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    embs = np.concatenate([np.load(p) for p in sorted((out / "img_emb").glob("*.npy"))])
    keys = [k for p in sorted((out / "metadata").glob("*.parquet"))
            for k in pq.read_table(p).column("image_path").to_pylist()]
    return dict(zip(keys, embs))


def our_embeddings(run_dir: Path) -> dict[str, np.ndarray]:
    """Key -> vector: our parquet holds ids; the ingested images table maps ids to members."""
    import pyarrow.parquet as pq

    id_to_key: dict[int, str] = {}
    for p in sorted((run_dir / "images").rglob("*.parquet")):
        t = pq.read_table(p, columns=["image_id", "key"]).to_pydict()
        id_to_key.update({int(i): k for i, k in zip(t["image_id"], t["key"])})
    out: dict[str, np.ndarray] = {}
    for p in sorted((run_dir / "embeddings" / SPACE).rglob("*.parquet")):
        t = pq.read_table(p, columns=["image_id", "embedding"]).to_pydict()
        for iid, v in zip(t["image_id"], t["embedding"]):
            out[id_to_key.get(int(iid), str(iid))] = np.asarray(v, np.float32)
    return out


def agreement(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> dict[str, Any]:
    common = sorted(set(ours) & set(theirs))
    if not common:
        return {"common_keys": 0, "ours_sample": sorted(ours)[:3], "theirs_sample":
                sorted(theirs)[:3]}
    a = np.stack([ours[k] for k in common]).astype(np.float32)
    b = np.stack([theirs[k] for k in common]).astype(np.float32)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"common_keys": len(common), "cosine_min": round(float(cos.min()), 5),
            "cosine_median": round(float(np.median(cos)), 5)}


THEIR_BREAKDOWN = r"""
import io, json, sys, tarfile, time, torch, open_clip
from PIL import Image
torch.set_num_threads(int(sys.argv[3]))
model, _, pre = open_clip.create_model_and_transforms(sys.argv[1], pretrained=sys.argv[2])
model.eval()
with tarfile.open(sys.argv[4]) as t:
    jpgs = [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith('.jpg')]
jpgs = jpgs[: int(sys.argv[5])]
def decode():
    return [Image.open(io.BytesIO(b)).convert('RGB') for b in jpgs]
def prep(ims):
    return torch.stack([pre(im) for im in ims])
ims = decode(); x = prep(ims)
with torch.no_grad():
    model.encode_image(x[:8])
t0 = time.perf_counter(); ims = decode(); t1 = time.perf_counter(); x = prep(ims)
t2 = time.perf_counter()
with torch.no_grad():
    model.encode_image(x)
t3 = time.perf_counter()
print(json.dumps({"decode_s": t1 - t0, "preprocess_s": t2 - t1, "forward_s": t3 - t2}))
"""


def breakdown(venv: Path, weights: Path, shard: Path, cfg_path: Path, batch: int,
              threads: int) -> dict[str, Any]:
    """Seconds per batch of decode, preprocess and forward: ours (the stage's own functions, in
    this process, with the run's config) and theirs (open_clip's PIL + torchvision transform, in
    the peers venv), single-process on the same JPEGs, decode and preprocess on one thread."""
    import torch

    from megapairs_ray import pixels
    from megapairs_ray.config import load_config
    from megapairs_ray.stages.embed import EmbedStage

    stage = EmbedStage(load_config(cfg_path, ["embed.decode_threads=1"]).embed)
    enc = stage.encoders[SPACE]
    with tarfile.open(shard) as t:
        jpgs = [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".jpg")]
    jpgs = jpgs[:batch]
    ims = pixels.decode_cpu(jpgs, stage.min_side, None)
    enc.encode_image(pixels.to_model_input(ims[:8], enc.spec, torch.float32))  # warm-up
    t0 = time.perf_counter()
    ims = pixels.decode_cpu(jpgs, stage.min_side, None)
    t1 = time.perf_counter()
    x = pixels.to_model_input(ims, enc.spec, torch.float32)
    t2 = time.perf_counter()
    enc.encode_image(x)
    t3 = time.perf_counter()
    ours = {"decode_s": t1 - t0, "preprocess_s": t2 - t1, "forward_s": t3 - t2}
    r = subprocess.run([str(venv / "bin" / "python"), "-c", THEIR_BREAKDOWN, MODEL,
                        str(weights), str(threads), str(shard), str(batch)],
                       capture_output=True, text=True, check=True)
    theirs = json.loads(r.stdout.strip().splitlines()[-1])
    return {"batch": len(jpgs), "torch_threads": threads,
            "ours": {k: round(v, 3) for k, v in ours.items()},
            "theirs": {k: round(v, 3) for k, v in theirs.items()}}


def versions(venv: Path) -> dict[str, Any]:
    probe = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
             "['clip-retrieval', 'torch', 'torchvision', 'open_clip_torch', 'webdataset', "
             "'pillow', 'numpy']}))")
    mine = subprocess.run([sys.executable, "-c", probe.replace("'clip-retrieval', ", "")
                           .replace("'webdataset'", "'webdataset', 'ray', 'megapairs-ray'")],
                          capture_output=True, text=True, check=True)
    theirs = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True,
                            text=True, check=True)
    return {"ours": json.loads(mine.stdout), "theirs": json.loads(theirs.stdout)}


def relative(cmd: list[str], subs: dict[str, str]) -> str:
    """The command as recorded: machine paths replaced by names."""
    text = " ".join(cmd)
    for path, name in subs.items():
        text = text.replace(path, name)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads on each side (ours: embed.num_cpus)")
    ap.add_argument("--peers-venv", default=default_peers_venv())
    ap.add_argument("--work", default=str(ROOT / "data" / "bench" / "peer-clip"))
    ap.add_argument("--order", choices=["theirs-first", "ours-first"], default="theirs-first")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-2core" /
                                         "peer_clip_inference.json"))
    args = ap.parse_args()
    venv, work = Path(args.peers_venv).resolve(), Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    import serve_clipback

    serve_clipback.tv_hook(venv)
    shards = build_shards(work / "shards", args.images, args.shard_size)
    weights = work / f"{MODEL}-random-seed0.pt"
    save_weights(weights)
    subs = {str(venv): "$PEERS_VENV", str(work): "WORK", str(ROOT) + "/": ""}

    their_out, run_dir = work / "theirs", work / "ours"
    subprocess.run(["rm", "-rf", str(their_out), str(run_dir)], check=True)
    t_cmd = theirs_cmd(venv, shards, their_out, weights, args.batch, args.threads)
    cfg_path = work / "ours.yaml"
    cfg_path.write_text(yaml.safe_dump(our_config(shards, run_dir, weights, args.batch,
                                                  args.threads), sort_keys=False))
    megapairs = str(Path(sys.executable).parent / "megapairs")
    ingest_cmd = [megapairs, "run", "-c", str(cfg_path), "--stages", "ingest"]
    embed_cmd = [megapairs, "run", "-c", str(cfg_path), "--stages", "embed"]
    # Our run starts a Ray of its own (address "local"), never a running cluster's.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled",
               # a busy shared machine starts Ray slowly (its agents missed the 30 s default)
               RAY_raylet_start_wait_time_s="180", RAY_agent_register_timeout_ms="180000")

    print("ours: ingest", flush=True)
    ingest = timed_run(ingest_cmd, work / "ours-ingest.log", env)
    runs: dict[str, dict[str, Any]] = {}
    sides = [("theirs", t_cmd, work / "theirs.log"), ("ours", embed_cmd, work / "ours-embed.log")]
    if args.order == "ours-first":
        sides.reverse()
    for name, cmd, log in sides:
        print(f"{name}: {relative(cmd, subs)[:160]}", flush=True)
        runs[name] = timed_run(cmd, log, env)
        print(f"{name}: {runs[name]}", flush=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    theirs_e, ours_e = their_embeddings(their_out), our_embeddings(run_dir)
    n_theirs, n_ours = len(theirs_e), len(ours_e)
    runs["theirs"].update(images=n_theirs, img_per_s=round(n_theirs / runs["theirs"]["wall_s"], 2),
                          img_per_cpu_s=round(n_theirs / runs["theirs"]["cpu_s"], 3))
    runs["ours"].update(images=n_ours, img_per_s=round(n_ours / runs["ours"]["wall_s"], 2),
                        img_per_cpu_s=round(n_ours / runs["ours"]["cpu_s"], 3),
                        stage_seconds=manifest["embed"]["seconds"],
                        stage_img_per_s=round(n_ours / manifest["embed"]["seconds"], 2))
    print("breakdown", flush=True)
    parts = breakdown(venv, weights, shards[0], cfg_path, args.batch, args.threads)
    result = {
        "what": "clip-retrieval 2.45 `clip inference` vs megapairs-ray's embed stage, one "
                "open_clip image encoder, same webdataset shards, one after the other",
        "machine": {"platform": platform.platform(), "machine": platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "shared": "yes: another engineer's Ray tests ran on the machine at the same "
                              "time (see each run's load average)"},
        "versions": versions(venv),
        "data": {"images": args.images, "shards": len(shards), "shard_size": args.shard_size,
                 "jpeg_sizes": SIZES, "jpeg_quality": 90, "kind": "synthetic (gradient, shapes, "
                 "blur, noise), a caption each", "bytes": sum(s.stat().st_size for s in shards)},
        "model": {"open_clip": MODEL, "weights": "random, torch seed 0, one state-dict file "
                  "both load", "precision": "fp32", "batch": args.batch,
                  "torch_threads": args.threads},
        "commands": {"theirs": relative(t_cmd, subs),
                     "ours_ingest": relative(ingest_cmd, subs),
                     "ours_embed": relative(embed_cmd, subs),
                     "ours_config": json.loads(json.dumps(yaml.safe_load(cfg_path.read_text())
                                                          ).replace(str(work), "WORK")),
                     "this": "python benchmarks/peer_clip_inference.py " + " ".join(
                         relative(sys.argv[1:], subs).split())},
        "order": [s[0] for s in sides],
        "theirs": runs["theirs"],
        "ours": runs["ours"],
        "ours_ingest": {**ingest, "seconds_in_manifest": manifest["ingest"]["seconds"]},
        "ratio_ours_over_theirs_img_per_s": round(runs["ours"]["img_per_s"]
                                                  / runs["theirs"]["img_per_s"], 3),
        "ratio_ours_over_theirs_img_per_cpu_s": round(runs["ours"]["img_per_cpu_s"]
                                                      / runs["theirs"]["img_per_cpu_s"], 3),
        "ratio_ours_incl_ingest_over_theirs_img_per_s": round(
            n_ours / (runs["ours"]["wall_s"] + ingest["wall_s"]) / runs["theirs"]["img_per_s"],
            3),
        "embeddings_agree": agreement(ours_e, theirs_e),
        "breakdown_per_batch": parts,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("theirs", "ours", "ratio_ours_over_theirs_img_per_s",
                                             "embeddings_agree", "breakdown_per_batch")},
                     indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
