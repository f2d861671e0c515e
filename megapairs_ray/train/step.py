"""One MMRet training step, free of Ray: the Ray Train loop, the plain-loop benchmark and the GPU
benchmark all run this same object.

A call takes one micro-batch as the loaders produce it (uint8 pixels, token ids), normalises the
pixels on the device, runs query and candidate images through the image tower in one pass, takes
the gathered InfoNCE loss and back-propagates (an alignment batch of captions and their images:
text-only queries and the symmetric loss, images to captions too); every ``grad_accum_steps``
calls it clips, steps AdamW and the linear warm-up/decay schedule.
"""

from __future__ import annotations

from contextlib import nullcontext
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
        self.model, self.optim, self.h = model, optim, num_hard_negatives
        self.rank, self.world = rank, world_size
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
        return (x.to(torch.float32) / 255.0 - self.mean) / self.std

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
        with sync:
            with self.autocast:
                queries, candidates = self.model(q_px, batch["input_ids"],
                                                 batch["attention_mask"], c_px, keys)
            (b, d), h = queries.shape, 0 if aligning else self.h
            queries, candidates = queries.float(), candidates.float()
            loss = mmret_loss(queries, candidates[:b], candidates[b:].view(b, h, d),
                              self.optim.temperature, rank=self.rank, world_size=self.world)
            if aligning:  # symmetric, as CLIP and LiT train: images also find their captions
                loss = (loss + mmret_loss(candidates, queries, queries[:0].view(b, 0, d),
                                          self.optim.temperature, rank=self.rank,
                                          world_size=self.world)) / 2
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

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
