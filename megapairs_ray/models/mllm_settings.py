"""The ``mllm`` family's settings: the released BGE-VL-MLLM prompts, the LoRA targets, and the
``mmret_mllm.json`` a checkpoint carries. Plain data, apart from ``models/mllm.py`` and its torch:
the training config (``train/config.py``) names these defaults in every process that reads a
config, Ray Train's controller and Ray Data's coordinators included."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megapairs_ray.errors import MegapairsError

SETTINGS_FILE = "mmret_mllm.json"
ADAPTER_CONFIG = "adapter_config.json"
IMAGE_PLACEHOLDER = "<image>"

# The released BGE-VL-MLLM prompts, as its ``data_process`` writes them (spaces included): the
# instruction and the query's text, then the image, in one Mistral [INST] turn.
RELEASED_INSTRUCTION = ("Retrieve the target image that best meets the combined criteria by "
                        "using both the provided image and the image retrieval instructions: ")
RELEASED_QUERY = "[INST] \n <instruct> {instruction} <query>  {text} \n <image> [/INST]"
RELEASED_TEXT_QUERY = "[INST] \n <instruct> {instruction} <query>  {text} \n [/INST]"
RELEASED_IMAGE_QUERY = "[INST] \n <instruct> {instruction} <query>  <image> [/INST]"
RELEASED_CANDIDATE = "[INST]  <image> [/INST]"
RELEASED_IMAGE_SIZE = 512

# LoRA on the language model's projections (attention and MLP), not on the vision tower.
DEFAULT_LORA_TARGETS = (r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj"
                        r"|down_proj)")


class MLLMConfigError(MegapairsError, ValueError):
    """A setting of the ``mllm`` family that cannot work; the message names the field."""


@dataclass(frozen=True)
class MLLMPrompts:
    """The prompt of each kind of input. ``{instruction}`` and ``{text}`` are filled in, and
    ``<image>`` stands for the image's tokens (as many as its tiles make)."""

    query: str = RELEASED_QUERY
    text_query: str = RELEASED_TEXT_QUERY
    image_query: str = RELEASED_IMAGE_QUERY
    candidate: str = RELEASED_CANDIDATE
    instruction: str = RELEASED_INSTRUCTION

    def check(self, where: str = "model.mllm.prompts") -> None:
        need = {"query": (1, True), "text_query": (0, True), "image_query": (1, False),
                "candidate": (1, False)}
        for name, (images, text) in need.items():
            value = getattr(self, name)
            if value.count(IMAGE_PLACEHOLDER) != images:
                raise MLLMConfigError(
                    f"{where}.{name} must hold the image placeholder {IMAGE_PLACEHOLDER} "
                    f"{'exactly once' if images else 'nowhere'}: {value!r}")
            if ("{text}" in value) != text:
                raise MLLMConfigError(f"{where}.{name} must {'' if text else 'not '}hold "
                                      f"{{text}}: {value!r}")


@dataclass(frozen=True)
class MLLMSettings:
    """What this family needs beyond the LLaVA-NeXT weights; saved as ``mmret_mllm.json``."""

    prompts: MLLMPrompts = field(default_factory=MLLMPrompts)
    # The square every image is squashed to before tiling (the released code's 512).
    image_size: int = RELEASED_IMAGE_SIZE
    # Room for the longest prompt in tokens, the image's tokens included; longer is cut.
    max_text_len: int = 3072

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> MLLMSettings:
        return cls(prompts=MLLMPrompts(**doc.get("prompts", {})),
                   image_size=int(doc.get("image_size", RELEASED_IMAGE_SIZE)),
                   max_text_len=int(doc.get("max_text_len", 3072)))

    def to_dict(self) -> dict[str, Any]:
        return {"family": "mllm", **asdict(self)}


def read_settings(path: str | Path) -> MLLMSettings:
    f = Path(path) / SETTINGS_FILE
    return MLLMSettings.from_dict(json.loads(f.read_text())) if f.is_file() else MLLMSettings()
