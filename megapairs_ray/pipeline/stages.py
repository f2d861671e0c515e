"""The pipeline's stages, in order: the one list. The CLI makes a command of each, the dataset
card shows their records in this order, and ``megapairs plan`` estimates each.

Adding a stage (docs/ARCHITECTURE.md): its plain per-unit work in ``stages/``, its declaration
(a ``Stage``) in ``pipeline/``, here, and its config section.
"""

from __future__ import annotations

from typing import Any

from megapairs_ray.errors import MegapairsError
from megapairs_ray.pipeline.embed import EMBED
from megapairs_ray.pipeline.engine import Stage
from megapairs_ray.pipeline.export import EXPORT
from megapairs_ray.pipeline.index import INDEX
from megapairs_ray.pipeline.ingest import INGEST
from megapairs_ray.pipeline.mine import MINE
from megapairs_ray.pipeline.synth import DESCRIBE, INSTRUCT

STAGES: tuple[Stage[Any], ...] = (INGEST, EMBED, INDEX, MINE, DESCRIBE, INSTRUCT, EXPORT)


class UnknownStageError(MegapairsError, ValueError):
    exit_code = 2


def stage(name: str) -> Stage[Any]:
    """The stage called ``name``."""
    for s in STAGES:
        if s.name == name:
            return s
    raise UnknownStageError(f"unknown stage {name!r}; known: {', '.join(stage_names())}")


def stage_names() -> list[str]:
    return [s.name for s in STAGES]
