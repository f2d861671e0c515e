"""Training configs for the tests: a tiny random CLIP on the toy triplet set."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

TINY_CLIP = {
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "max_position_embeddings": 16,
                    "vocab_size": 49408},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    "projection_dim": 32,
}


def train_config(annotations: str, storage_path: str, name: str, **sections: Any,
                 ) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "profile": "test",
        "data": {"annotations": [annotations], "loader_num_cpus": 0.25, "loader_batch_rows": 8,
                 "decode_threads": 1},
        "model": {"init": None, "config_overrides": TINY_CLIP},
        "optim": {"lr": 5e-4, "max_steps": 12, "batch_size": 4, "warmup_steps": 2,
                  "temperature": 0.05},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.25},
        "checkpoint": {"storage_path": storage_path, "name": name, "every_steps": 4,
                       "log_every_steps": 2, "max_failures": 1},
    }
    for section, values in sections.items():
        doc[section] = {**doc.get(section, {}), **values}
    return doc


def kill_at_first_checkpoint(doc: dict[str, Any], config_path: Path) -> list[int]:
    """Run ``megapairs train`` on ``doc`` in a driver process of its own, SIGKILL it once Ray
    Train has registered a checkpoint, wait for the dead driver's trainers to free their
    CPUs; returns the registered checkpoints' steps."""
    import ray

    config_path.write_text(json.dumps(doc))
    run = Path(doc["checkpoint"]["storage_path"]) / doc["checkpoint"]["name"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "megapairs_ray.cli", "train", "--config",
                             str(config_path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        # A checkpoint counts once Ray Train has registered it in its run snapshot.
        while time.time() < deadline and not (run / "checkpoint_manager_snapshot.json").exists():
            assert proc.poll() is None, "the training driver exited before its first checkpoint"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Ray tears down the dead driver's trainers; wait for their CPUs before relaunching.
    deadline = time.time() + 60
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < 1.5:
        time.sleep(0.5)
    # What counts is the newest checkpoint Ray Train registered: a worker that outlived its
    # driver for a moment may have uploaded a later folder that was never registered.
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    return sorted(int(c["checkpoint_dir_name"].split("_")[1])
                  for c in snapshot["checkpoint_results"])
