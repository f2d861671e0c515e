"""InfoNCE over in-batch candidates plus hard negatives, gathered across workers.

For B queries per worker and W workers, every query scores against all W*B positives and all
W*B*H hard negatives; its own positive is the label. The gather carries gradients back to the
worker that owns each candidate (``torch.distributed.nn.functional.all_gather``), so after DDP
averages the workers' gradients they equal one process's gradient over the whole global batch
(a test checks this with real gloo collectives). The collective is a parameter, so the maths is
also testable in one process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

GatherFn = Callable[[torch.Tensor], list[torch.Tensor]]


def torch_distributed_gather(t: torch.Tensor) -> list[torch.Tensor]:
    from torch.distributed.nn.functional import all_gather

    return list(all_gather(t.contiguous()))


def mmret_loss(queries: torch.Tensor, positives: torch.Tensor, hard_negatives: torch.Tensor,
               temperature: float = 0.02, rank: int = 0, world_size: int = 1,
               gather: GatherFn | None = None) -> torch.Tensor:
    """``queries`` [B, D], ``positives`` [B, D], ``hard_negatives`` [B, H, D], all normalised."""
    b, d = queries.shape
    negs = hard_negatives.reshape(-1, d)
    if world_size > 1:
        gather = gather or torch_distributed_gather
        pos_parts = gather(positives)
        neg_parts = gather(negs)
        pos_parts[rank] = positives  # the local slice straight from the graph
        neg_parts[rank] = negs
        all_pos = torch.cat(pos_parts)
        all_negs = torch.cat(neg_parts)
    else:
        all_pos, all_negs = positives, negs
    candidates = torch.cat([all_pos, all_negs])
    logits = queries @ candidates.T / temperature
    labels = torch.arange(b, device=queries.device) + rank * b
    return F.cross_entropy(logits, labels)
