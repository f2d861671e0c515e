"""Pair mining: neighbours in three spaces -> (query, target) pairs with hard negatives.

The paper's rules (docs/method.md §1) and, where it is silent, ours — each a config field:

- A neighbour of query q in space s is a **target candidate** when ``lo_s < sim < hi_s``. Above
  ``hi_s`` it is a near-duplicate of q: never a target, never a negative. q itself is skipped.
- **Heterogeneous targets**: up to ``targets_per_query`` targets, taken round-robin over the
  spaces in config order, each space offering its candidates best first; a target already taken
  through another space is skipped, and a target found in several spaces is one pair that keeps
  every space and similarity it was found with.
- **Hard negatives** of (q, t): q's other retrieved neighbours in any space — not q, not t, not a
  near-duplicate of q — hardest (highest similarity in any space) first, ties by id, at most
  ``max_hard_negatives``. The list starts with q itself, as the released dataset's ``hns[0]``.
  A pair with fewer than ``min_hard_negatives`` mined negatives is rejected with the reason.

Nothing is random here: given the same neighbours the output is identical; the seed only chooses
which images are queries (``query_fraction``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megapairs_ray.config import MineConfig
from megapairs_ray.reasons import Reason

TOO_FEW_NEGATIVES = Reason.TOO_FEW_HARD_NEGATIVES


def pair_id(query: int, target: int) -> int:
    digest = hashlib.blake2b(f"{query}:{target}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def is_query(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stable, seeded sample of the ids: the same id is a query in every task and rerun."""
    if fraction >= 1.0:
        return np.ones(len(ids), dtype=bool)
    # splitmix64 of (id + seed * golden ratio): every bit of id and seed moves the result.
    z = ids.astype(np.int64).view(np.uint64) + np.uint64(
        (seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


@dataclass
class Target:
    spaces: list[str] = field(default_factory=list)
    sims: list[float] = field(default_factory=list)


def mine_query(query: int, neighbours: dict[str, tuple[np.ndarray, np.ndarray]],
               cfg: MineConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pairs and rejects of one query, from its (scores, ids) neighbour lists per space."""
    candidates: dict[str, list[tuple[float, int]]] = {}
    near_dup: set[int] = set()
    hardness: dict[int, float] = {}
    found: dict[int, Target] = {}
    for space in cfg.spaces:
        lo, hi = cfg.windows[space]
        scores, ids = neighbours[space]
        cands = []
        for s, i in zip(scores.tolist(), ids.tolist()):
            if i == query or i == -1:
                continue
            if s >= hi:
                near_dup.add(i)
                continue
            hardness[i] = max(hardness.get(i, -np.inf), s)
            if s > lo:
                cands.append((s, i))
                t = found.setdefault(i, Target())
                t.spaces.append(space)
                t.sims.append(float(s))
        # Best first, ties by id: the same input always gives the same order.
        candidates[space] = sorted(cands, key=lambda c: (-c[0], c[1]))
    for i in near_dup:  # a near-duplicate in one space is one everywhere
        hardness.pop(i, None)
        found.pop(i, None)
    for space in cfg.spaces:
        candidates[space] = [c for c in candidates[space] if c[1] not in near_dup]

    chosen: list[int] = []
    cursors = dict.fromkeys(cfg.spaces, 0)
    while len(chosen) < cfg.targets_per_query:
        progressed = False
        for space in cfg.spaces:
            if len(chosen) >= cfg.targets_per_query:
                break
            lst = candidates[space]
            while cursors[space] < len(lst) and lst[cursors[space]][1] in chosen:
                cursors[space] += 1
            if cursors[space] < len(lst):
                chosen.append(lst[cursors[space]][1])
                cursors[space] += 1
                progressed = True
        if not progressed:
            break

    by_hardness = sorted(hardness.items(), key=lambda kv: (-kv[1], kv[0]))
    pairs, rejects = [], []
    for t in chosen:
        negatives = [i for i, _ in by_hardness if i != t][: cfg.max_hard_negatives]
        if len(negatives) < cfg.min_hard_negatives:
            rejects.append({"query_id": query, "target_id": t, "reason": TOO_FEW_NEGATIVES,
                            "detail": f"{len(negatives)} < {cfg.min_hard_negatives}"})
            continue
        pairs.append({"pair_id": pair_id(query, t), "query_id": query, "target_id": t,
                      "spaces": found[t].spaces, "similarities": found[t].sims,
                      "hard_negatives": [query, *negatives]})
    return pairs, rejects


def mine_batch(query_ids: Sequence[int],
               neighbours: dict[str, tuple[np.ndarray, np.ndarray]],
               cfg: MineConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``neighbours[space]`` = (scores [nq, k], ids [nq, k]) aligned with ``query_ids``."""
    pairs: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for row, q in enumerate(query_ids):
        p, r = mine_query(int(q), {s: (sc[row], ix[row]) for s, (sc, ix) in neighbours.items()},
                          cfg)
        pairs += p
        rejects += r
    return pairs, rejects
