"""The retriever families, and which one a checkpoint is.

Every family offers one interface (``image_features``, ``text_features``, ``forward``,
``embed_candidates``, ``embed_queries``, ``freeze``, ``save_pretrained``, ``dim``,
``model_input``), so training, evaluation, the gallery and the service never ask which family
they hold. A checkpoint says its own family in its ``config.json``, as ``transformers`` does:

- ``clip``: ``model_type: clip``, a Hugging Face ``CLIPModel`` folder (OpenAI CLIP, BGE-VL-base /
  large, MMRet-CLIP, what this project trains on CLIP) or a hub id;
- ``towers``: ``model_type: megapairs_towers`` (``models/towers.py``);
- ``mllm``: ``model_type: llava_next`` (a released BGE-VL-MLLM, a twin), or a ``peft`` adapter
  folder written by this project's training, which carries ``mmret_mllm.json``
  (``models/mllm.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import storage

FAMILIES = ("clip", "towers", "mllm")
MODEL_TYPES = {"clip": "clip", "megapairs_towers": "towers", "llava_next": "mllm"}
# The mllm family's own settings: in every checkpoint it writes, adapter-only ones included
# (those have no config.json).
MLLM_SETTINGS = "mmret_mllm.json"


def register_with_transformers() -> None:
    """Make ``model_type: megapairs_towers`` a config type ``transformers`` knows, so its Auto
    classes (``AutoTokenizer`` reads a folder's config.json) take a towers checkpoint as they
    take any other."""
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "megapairs_towers" in CONFIG_MAPPING:
        return

    class MMRetTowersConfig(PretrainedConfig):
        model_type = "megapairs_towers"

    AutoConfig.register("megapairs_towers", MMRetTowersConfig)


class UnknownFamily(MegapairsError, ValueError):
    """A checkpoint whose config names no retriever family this project knows."""


def hub_family(hub_id: str) -> str:
    """A hub id's family from its config (fetched, or from the local hub cache); CLIP when it
    cannot be read (offline and not cached): loading it then names the real problem."""
    from transformers import AutoConfig

    try:
        model_type = getattr(AutoConfig.from_pretrained(hub_id), "model_type", None)
    except (OSError, ValueError):
        return "clip"
    return MODEL_TYPES.get(model_type, "clip")  # type: ignore[arg-type]


def checkpoint_family(path: str) -> str:
    """The family of a local checkpoint folder, or of a hub id (``hub_family``)."""
    if (Path(path) / MLLM_SETTINGS).is_file():
        return "mllm"
    config = Path(path) / "config.json"
    if not config.is_file():
        if storage.is_remote(path) or Path(path).exists():
            raise UnknownFamily(f"{path} is no checkpoint: it has no config.json")
        return hub_family(path)
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (ValueError, AttributeError) as e:
        raise UnknownFamily(f"{config}: not a JSON object ({e})") from e
    if model_type not in MODEL_TYPES:
        raise UnknownFamily(f"{config}: model_type {model_type!r} is no retriever family "
                            f"here (known: {', '.join(sorted(MODEL_TYPES))})")
    return MODEL_TYPES[model_type]


def family_of(uri: str) -> str:
    """The family of a checkpoint anywhere (a local folder, s3://, a hub id), read from its
    ``config.json`` without loading it; an unknown type is taken for CLIP (loading the
    checkpoint names any real problem)."""
    if storage.exists(storage.join(uri, MLLM_SETTINGS)):
        return "mllm"
    config = storage.join(uri, "config.json")
    if not storage.exists(config):
        return "clip" if storage.is_remote(uri) or Path(uri).exists() else hub_family(uri)
    doc = storage.read_json(config)
    return MODEL_TYPES.get(doc.get("model_type") if isinstance(doc, dict) else None, "clip")


# The CLIP family's pixels: 2 since they are the released processor's (docs/method.md §4). A
# gallery records it, so one embedded with the earlier pixels is embedded again, and a service
# started on an old one says so.
CLIP_PIXELS_FORM = 2


def load_retriever(path: str, trainable: bool = False) -> Any:
    """The retriever a local checkpoint folder (or hub id) holds, whichever its family.
    ``trainable``: an mllm LoRA adapter stays an adapter, to train on (resume)."""
    family = checkpoint_family(path)
    if family == "towers":
        from megapairs_ray.models.towers import MMRetTowers

        return MMRetTowers.from_pretrained(path)
    if family == "mllm":
        from megapairs_ray.models.mllm import MMRetMLLM

        return MMRetMLLM.from_pretrained(path, trainable=trainable)
    from megapairs_ray.models.mmret import MMRetCLIP

    return MMRetCLIP.from_pretrained(path)
