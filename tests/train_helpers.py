"""Training configs for the tests: a tiny random CLIP on the toy triplet set."""

from __future__ import annotations

from typing import Any

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
