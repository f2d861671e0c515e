"""TrainStep alone (no Ray): accumulation, schedule, precision, state round trip."""

from __future__ import annotations

import copy

import pytest
import torch

from megapairs_ray.models.inputs import ModelInput
from megapairs_ray.models.mmret import MMRetCLIP
from megapairs_ray.train.config import OptimConfig
from megapairs_ray.train.step import TrainStep, linear_schedule

from .train_helpers import TINY_CLIP


def _batch(seed: int, b: int = 4, h: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def px(*s: int) -> torch.Tensor:
        return torch.randint(0, 256, s, generator=g, dtype=torch.uint8)

    ids = torch.randint(1, 49000, (b, 16), generator=g)
    ids[:, -1] = 49407
    return {"query_pixels": px(b, 3, 32, 32), "target_pixels": px(b, 3, 32, 32),
            "negative_pixels": px(b, h, 3, 32, 32), "input_ids": ids,
            "attention_mask": torch.ones_like(ids)}


def _step(**optim) -> TrainStep:
    torch.manual_seed(0)
    model = MMRetCLIP.from_config(**TINY_CLIP)
    cfg = OptimConfig(**{"lr": 1e-3, "max_steps": 10, "batch_size": 4, **optim})
    return TrainStep(model, model, cfg, 2, ModelInput(32, 16), torch.device("cpu"))


def test_linear_warmup_then_decay():
    f = linear_schedule(2, 10)
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_accumulation_steps_once_per_k_micro_batches_with_their_mean_gradient():
    acc = _step(grad_accum_steps=2, max_grad_norm=None)
    before = copy.deepcopy(acc.model.state_dict())
    assert acc(_batch(1)) is None and acc.step == 0
    assert all(torch.equal(v, acc.model.state_dict()[k]) for k, v in before.items())
    loss = acc(_batch(2))
    assert loss is not None and acc.step == 1
    # The accumulated gradient is the mean of the two micro-batches' gradients.
    ref = _step(max_grad_norm=None)
    grads = []
    for seed in (1, 2):
        ref.optimizer.zero_grad()
        q, c = ref.model(ref._pixels(_batch(seed)["query_pixels"]), _batch(seed)["input_ids"],
                         _batch(seed)["attention_mask"],
                         ref._pixels(torch.cat([_batch(seed)["target_pixels"],
                                                _batch(seed)["negative_pixels"].flatten(0, 1)])))
        from megapairs_ray.train.loss import mmret_loss

        mmret_loss(q, c[:4], c[4:].view(4, 2, -1), 0.02).backward()
        grads.append({n: p.grad.clone() for n, p in ref.model.named_parameters()
                      if p.grad is not None})
    acc2 = _step(grad_accum_steps=2, max_grad_norm=None)
    acc2.optimizer.step = lambda: None  # keep the gradients for inspection
    acc2.optimizer.zero_grad = lambda set_to_none=True: None
    acc2(_batch(1))
    acc2(_batch(2))
    for n, p in acc2.model.named_parameters():
        if n in grads[0]:
            assert torch.allclose(p.grad, (grads[0][n] + grads[1][n]) / 2, atol=1e-5), n


def test_bf16_autocast_runs_and_state_round_trips():
    s = _step(precision="bf16", warmup_steps=2)
    losses = [float(s(_batch(i))) for i in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    state = s.state_dict()
    again = _step(precision="bf16", warmup_steps=2)
    again.load_state_dict(state)
    assert again.step == 3
    assert again.scheduler.get_last_lr() == pytest.approx(s.scheduler.get_last_lr())
    assert again.optimizer.state_dict()["state"].keys() == s.optimizer.state_dict()["state"].keys()
