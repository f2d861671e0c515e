"""One MMRet training step, free of Ray: the Ray Train loop, the plain-loop benchmark and the GPU
benchmark all run this same object.

A call takes one micro-batch as the loaders produce it (uint8 pixels, token ids), normalises the
pixels on the device, runs query and candidate images through the image tower in one pass, takes
the gathered InfoNCE loss and back-propagates (an alignment batch of captions and their images:
text-only queries and the symmetric loss, images to captions too); every ``grad_accum_steps``
calls it clips, steps AdamW and the linear warm-up/decay schedule.

With ``optim.grad_cache_chunk`` the micro-batch goes through GradCache (Gao et al., 2021)
instead: every query and candidate is embedded in chunks without a graph, the loss (gathered
across workers as ever) gives the gradient of each embedding, and each chunk is embedded again
with its graph and back-propagated from that gradient. The parameters' gradients are the
one-pass step's (a test checks it); memory holds one chunk's activations, not the batch's.
Each chunk's random state is replayed in its second pass, so dropout masks match.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from megapairs_ray.models.inputs import ModelInput
from megapairs_ray.train.config import OptimConfig
from megapairs_ray.train.loss import mmret_loss


def linear_schedule(warmup_steps: int, max_steps: int) -> Any:
    """Multiplier of the peak lr at each step: linear warm-up, then linear decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))

    return factor


class TrainStep:
    """``model`` is what runs forward (DDP-wrapped when distributed); ``core`` the bare
    retriever (any family) whose parameters are optimised."""

    def __init__(self, model: nn.Module, core: nn.Module, optim: OptimConfig,
                 num_hard_negatives: int, model_input: ModelInput, device: torch.device,
                 rank: int = 0, world_size: int = 1) -> None:
        self.model, self.core, self.optim, self.h = model, core, optim, num_hard_negatives
        self.rank, self.world = rank, world_size
        self.device = device
        self.mean = torch.tensor(model_input.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(model_input.std, device=device).view(1, 3, 1, 1)
        trainable = [(n, p) for n, p in core.named_parameters() if p.requires_grad]
        decay = [p for n, p in trainable if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embedding" not in n)]
        self.params = [p for _, p in trainable]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=optim.lr, betas=optim.betas, eps=optim.eps,
            fused=device.type == "cuda")  # one kernel per step instead of one per tensor
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_schedule(optim.warmup_steps, optim.max_steps))
        self.autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                         if optim.precision == "bf16" else nullcontext())
        self.step = 0
        self._micro = 0
        self._loss_sum: torch.Tensor | float = 0.0

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 squares -> what the family's image input is (normalised squares, or tiles),
        made once per micro-batch."""
        return self.core.prepare_pixels((x.to(torch.float32) / 255.0 - self.mean) / self.std)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Train on one micro-batch; returns the mean loss of the accumulated micro-batches
        when this call completed an optimiser step, else None. The loss stays a device tensor:
        reading it would wait for the GPU, so callers read it only when they log."""
        last_micro = (self._micro + 1) % self.optim.grad_accum_steps == 0
        sync = (nullcontext() if last_micro or not hasattr(self.model, "no_sync")
                else self.model.no_sync())
        # Alignment batches (captions) have no query images and no hard negatives.
        aligning = "query_pixels" not in batch
        q_px = None if aligning else self._pixels(batch["query_pixels"])
        c_px = self._pixels(batch["target_pixels"] if aligning else
                            torch.cat([batch["target_pixels"],
                                       batch["negative_pixels"].flatten(0, 1)]))
        keys = None
        if "target_keys" in batch:  # names of the images, for a frozen tower's feature cache
            keys = batch["target_keys"] if aligning else torch.cat([
                batch["query_keys"], batch["target_keys"], batch["negative_keys"].flatten()])
        if self.optim.grad_cache_chunk:
            loss = self._grad_cache(q_px, batch["input_ids"], batch["attention_mask"], c_px,
                                    aligning, last_micro)
        else:
            with sync:
                with self.autocast:
                    queries, candidates = self.model(q_px, batch["input_ids"],
                                                     batch["attention_mask"], c_px, keys)
                loss = self._loss(queries.float(), candidates.float(), aligning)
                (loss / self.optim.grad_accum_steps).backward()
        self._loss_sum += loss.detach()
        self._micro += 1
        if not last_micro:
            return None
        if self.optim.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        mean_loss = self._loss_sum / self.optim.grad_accum_steps
        self._loss_sum = 0.0
        return mean_loss  # type: ignore[return-value]

    def _loss(self, queries: torch.Tensor, candidates: torch.Tensor, aligning: bool
              ) -> torch.Tensor:
        (b, d), h = queries.shape, 0 if aligning else self.h
        loss = mmret_loss(queries, candidates[:b], candidates[b:].view(b, h, d),
                          self.optim.temperature, rank=self.rank, world_size=self.world)
        if aligning:  # symmetric, as CLIP and LiT train: images also find their captions
            loss = (loss + mmret_loss(candidates, queries, queries[:0].view(b, 0, d),
                                      self.optim.temperature, rank=self.rank,
                                      world_size=self.world)) / 2
        return loss

    def _grad_cache(self, q_px: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor,
                    c_px: torch.Tensor, aligning: bool, last_micro: bool) -> torch.Tensor:
        """One micro-batch by GradCache (module docstring); returns its loss."""
        n = self.optim.grad_cache_chunk or len(ids)
        q_chunks = [(None if q_px is None else q_px[i : i + n], ids[i : i + n], mask[i : i + n])
                    for i in range(0, len(ids), n)]
        c_chunks = [c_px[i : i + n] for i in range(0, len(c_px), n)]

        def embed(chunk: Any, queries: bool) -> torch.Tensor:
            with self.autocast:
                if queries:
                    out = self.model(chunk[0], chunk[1], chunk[2], None, part="queries")
                else:
                    out = self.model(None, ids[:0], None, chunk, part="candidates")
            return out.float()

        # 1. Every embedding without a graph, each chunk's random state kept for its replay.
        states, reps = [], []
        with torch.no_grad():
            for chunk, is_query in [(c, True) for c in q_chunks] + [(c, False) for c in c_chunks]:
                states.append(_RandomState(self.device))
                reps.append(embed(chunk, is_query))
        # 2. The loss over the cached embeddings, and its gradient for each of them.
        queries = torch.cat(reps[: len(q_chunks)]).requires_grad_()
        candidates = torch.cat(reps[len(q_chunks) :]).requires_grad_()
        loss = self._loss(queries, candidates, aligning)
        (loss / self.optim.grad_accum_steps).backward()
        grads = (list(queries.grad.split([len(c[1]) for c in q_chunks]))  # type: ignore[union-attr]
                 + list(candidates.grad.split([len(c) for c in c_chunks])))  # type: ignore[union-attr]
        # 3. Each chunk again, with its graph, back-propagated from its cached gradient. DDP
        # is kept out of it (a candidates-only chunk leaves the text tower's gradients unset,
        # which its reducer would wait for); the workers' gradients are averaged once, below.
        chunks = [(c, True) for c in q_chunks] + [(c, False) for c in c_chunks]
        no_sync = getattr(self.model, "no_sync", nullcontext)
        for (chunk, is_query), state, grad in zip(chunks, states, grads):
            with no_sync(), state.replay():
                embed(chunk, is_query).backward(grad)
        if last_micro and self.world > 1:
            _average_across_workers(self.params, self.world)
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])


def _average_across_workers(params: list[torch.Tensor], world: int,
                            bucket_elements: int = 1 << 24) -> None:
    """Every parameter's gradient averaged over the workers (what DDP's synchronised backward
    does), in flat buckets of up to ``bucket_elements`` so a large model costs few collectives.
    A parameter no chunk reached counts as a zero gradient."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for i, p in enumerate(params):
        bucket.append(p.grad)  # type: ignore[arg-type]
        size += p.numel()
        if size >= bucket_elements or i == len(params) - 1:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= world
            for g, avg in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(avg)
            bucket, size = [], 0


class _RandomState:
    """The random state of this moment (CPU, and the GPU when training on one), to run a chunk
    again with the same dropout masks."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device if device.type == "cuda" else None
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda is not None else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[self.cuda] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu_state)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda_state, self.cuda)
            yield
