"""The batched work of the service, without Ray: encode a batch of queries, search a batch of
vectors, or both in one pass.

Both layouts call these functions: the split layout's query-encoder and search deployments
each run one half, the colocated deployment runs ``answer`` (encode and search in one batch,
in one process, with one batch wait). Tests and benchmarks call them directly.

A failure that belongs to one request (an image that passes the ingress's header checks but
not a full decode) is returned in that request's place, never raised for the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from megapairs_ray.serve.api import ApiError, Query, SearchCall

if TYPE_CHECKING:  # torch and FAISS load in the replicas, not where the app is built
    from megapairs_ray.models.retriever import RetrieverEncoder
    from megapairs_ray.serve.search import GallerySearcher


def encode_queries(encoder: RetrieverEncoder, queries: Sequence[Query],
                   ) -> list[np.ndarray | ApiError]:
    """One encoder pass for the batch; an undecodable image fails only its own query."""
    from megapairs_ray.models.retriever import UndecodableImage

    try:
        return list(encoder.queries([q.image for q in queries], [q.text for q in queries]))
    except UndecodableImage:
        out: list[np.ndarray | ApiError] = []
        for q in queries:
            try:
                out.append(encoder.queries([q.image], [q.text])[0])
            except UndecodableImage as e:
                out.append(ApiError(422, "image_corrupt_image", f"the image is refused: {e}"))
        return out


def search_vectors(searcher: GallerySearcher, calls: Sequence[tuple[np.ndarray, int, bool]],
                   ) -> list[list[dict[str, Any]]]:
    """One index search for the batch with its largest k, each call sliced to its own k and,
    where asked, deduplicated (clip-retrieval's ``deduplicate``)."""
    if not calls:
        return []
    k = max(k for _, k, _ in calls)
    hits = searcher.search(np.stack([v for v, _, _ in calls]), k)
    return [searcher.deduplicate(row[:k_]) if dedup else row[:k_]
            for row, (_, k_, dedup) in zip(hits, calls)]


def answer(encoder: RetrieverEncoder, searcher: GallerySearcher, calls: Sequence[SearchCall],
           ) -> list[list[dict[str, Any]] | ApiError]:
    """Encode the batch's queries in one pass, then search every vector in one pass."""
    to_encode = [i for i, c in enumerate(calls) if isinstance(c.what, Query)]
    vectors: dict[int, np.ndarray | ApiError] = {
        i: c.what for i, c in enumerate(calls) if not isinstance(c.what, Query)}
    if to_encode:
        encoded = encode_queries(encoder, [calls[i].what for i in to_encode])  # type: ignore[misc]
        vectors.update(zip(to_encode, encoded))
    ok = [i for i in range(len(calls)) if not isinstance(vectors[i], ApiError)]
    found = search_vectors(searcher, [(vectors[i], calls[i].k, calls[i].deduplicate)  # type: ignore[misc]
                                      for i in ok])
    out: list[list[dict[str, Any]] | ApiError] = [vectors[i] for i in range(len(calls))]  # type: ignore[misc]
    for i, hits in zip(ok, found):
        out[i] = hits
    return out
