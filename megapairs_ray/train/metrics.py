"""Zero-shot composed-image-retrieval metrics, as the benchmarks' official scripts define them.

All functions take *rankings*: for each query, gallery ids ordered best first (the caller has
already removed what a protocol excludes, e.g. CIRR's reference image).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def average_precision_at_k(ranking: Sequence[object], positives: set[object], k: int) -> float:
    """CIRCO's AP@k: sum of precision@i over relevant ranks i <= k, over min(k, |positives|)."""
    if not positives:
        raise ValueError("a query needs at least one ground truth")
    hits, total = 0, 0.0
    for i, item in enumerate(ranking[:k], start=1):
        if item in positives:
            hits += 1
            total += hits / i
    return total / min(k, len(positives))


def circo_map_at_k(rankings: Sequence[Sequence[object]], positives: Sequence[set[object]],
                   ks: Sequence[int] = (5, 10, 25, 50)) -> dict[str, float]:
    """Mean AP@k over queries (CIRCO: several ground truths per query), in percent."""
    return {f"mAP@{k}": 100.0 * float(np.mean([average_precision_at_k(r, p, k)
                                                for r, p in zip(rankings, positives)]))
            for k in ks}


def recall_at_k(rankings: Sequence[Sequence[object]], targets: Sequence[object],
                ks: Sequence[int], prefix: str = "R") -> dict[str, float]:
    """Share of queries whose target is within the top k, in percent (CIRR, FashionIQ)."""
    out = {}
    for k in ks:
        hits = [t in list(r[:k]) for r, t in zip(rankings, targets)]
        out[f"{prefix}@{k}"] = 100.0 * float(np.mean(hits))
    return out


def cirr_metrics(rankings: Sequence[Sequence[object]], targets: Sequence[object],
                 subsets: Sequence[Sequence[object]], references: Sequence[object],
                 ) -> dict[str, float]:
    """CIRR: Recall@{1,5,10,50} over the gallery without the reference image, and
    Recall_subset@{1,2,3} over the query's own subset (reference excluded), ranked as in the
    full ranking."""
    full = [[g for g in r if g != ref] for r, ref in zip(rankings, references)]
    out = recall_at_k(full, targets, (1, 5, 10, 50))
    sub = []
    for r, members, ref in zip(full, subsets, references):
        keep = set(members) - {ref}
        sub.append([g for g in r if g in keep])
    out.update(recall_at_k(sub, targets, (1, 2, 3), prefix="R_subset"))
    return out


def genecis_recall_at_k(scores: Sequence[Sequence[float]], positive_index: Sequence[int],
                        ks: Sequence[int] = (1, 2, 3)) -> dict[str, float]:
    """GeneCIS: each query ranks its own small gallery (the positive and its distractors);
    R@k = the positive is within the top k, in percent.

    Ties rank pessimistically: the positive's rank is 1 + the number of distractors scoring at
    least as high, so a distractor tied with the positive beats it. (GeneCIS puts the positive
    at gallery index 0, where an argmax or a stable sort would count every tie as a hit.)
    """
    if len(scores) != len(positive_index):
        raise ValueError("scores and positive_index must pair up")
    ranks = []
    for s, p in zip(scores, positive_index):
        row = np.asarray(s, dtype=np.float64)
        ranks.append(1 + int(np.count_nonzero(np.delete(row, p) >= row[p])))
    return {f"R@{k}": 100.0 * float(np.mean([r <= k for r in ranks])) for k in ks}


def genecis_recall_at_1(scores: Sequence[Sequence[float]], positive_index: Sequence[int],
                        ) -> float:
    """GeneCIS R@1 (percent); a positive tied with a distractor is a miss."""
    return genecis_recall_at_k(scores, positive_index, (1,))["R@1"]
