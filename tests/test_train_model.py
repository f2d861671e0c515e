"""MMRet-CLIP: composed queries, HF round trip, and the gathered InfoNCE loss."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from megapairs_ray.models.mmret import MMRetCLIP
from megapairs_ray.train.loss import mmret_loss

TINY = {
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "vocab_size": 99, "max_position_embeddings": 16},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    "projection_dim": 24,
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MMRetCLIP.from_config(**TINY).eval()


def test_composed_query_is_the_normalised_sum_of_projections(model):
    px = torch.randn(3, 3, 32, 32)
    ids = torch.randint(0, 99, (3, 7))
    with torch.no_grad():
        q = model.embed_queries(px, ids)
        want = F.normalize(model.image_features(px) + model.text_features(ids), dim=-1)
        assert torch.allclose(q, want, atol=1e-6)
        assert torch.allclose(q.norm(dim=-1), torch.ones(3), atol=1e-5)
        # Not the sum of normalised parts: the paper sums before normalising.
        other = F.normalize(F.normalize(model.image_features(px), dim=-1)
                            + F.normalize(model.text_features(ids), dim=-1), dim=-1)
        assert not torch.allclose(q, other, atol=1e-3)
        img_only = model.embed_queries(pixel_values=px)
        assert torch.allclose(img_only, model.embed_candidates(px), atol=1e-6)
    with pytest.raises(ValueError):
        model.embed_queries()


def test_hf_clip_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "config.json").exists()
    again = MMRetCLIP.from_pretrained(tmp_path / "ckpt").eval()
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.embed_candidates(px), again.embed_candidates(px), atol=1e-6)


def _batch(seed, b=4, h=3, d=16):
    g = torch.Generator().manual_seed(seed)
    n = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    return n(b, d), n(b, d), n(b, h, d)


def test_gathered_loss_equals_one_process_on_the_whole_batch():
    """Two workers' losses (collective swapped for the real tensors) average to the loss of one
    process over both halves, with the same candidate set."""
    (q0, p0, n0), (q1, p1, n1) = _batch(1), _batch(2)
    parts = {"pos": [p0, p1], "neg": [n0.reshape(-1, 16), n1.reshape(-1, 16)]}

    def gather(t):
        key = "pos" if t.shape[0] == 4 else "neg"
        return [x.clone() for x in parts[key]]

    l0 = mmret_loss(q0, p0, n0, rank=0, world_size=2, gather=gather)
    l1 = mmret_loss(q1, p1, n1, rank=1, world_size=2, gather=gather)
    q, p, n = torch.cat([q0, q1]), torch.cat([p0, p1]), torch.cat([n0, n1])
    single = mmret_loss(q, p, n)
    assert torch.allclose((l0 + l1) / 2, single, atol=1e-6)


def test_loss_by_hand_and_it_prefers_the_positive():
    q, p, n = _batch(3, b=2, h=1, d=8)
    cands = torch.cat([p, n.reshape(-1, 8)])
    logits = q @ cands.T / 0.02
    want = -(torch.log_softmax(logits, dim=1)[torch.arange(2), torch.arange(2)]).mean()
    assert torch.allclose(mmret_loss(q, p, n), want, atol=1e-6)
    assert mmret_loss(p, p, n) < mmret_loss(q, p, n)  # queries equal to positives: lower loss


def _gloo_worker(rank, port, out, work):
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out[rank] = work(rank)
    dist.destroy_process_group()


def on_two_gloo_workers(work):
    """``work(rank)`` on two spawned processes joined in a gloo group; their results by rank."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A spawned manager, not a forked one: a fork of this process would carry the session's
    # Ray driver with it, and that copy's exit can take the session's cluster down.
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.spawn(_gloo_worker, args=(port, out, work), nprocs=2, join=True)
    results = dict(out)
    manager.shutdown()
    return results


def _gathered_loss(rank):
    q, p, n = _batch(rank + 1)
    p.requires_grad_(True)
    loss = mmret_loss(q, p, n, rank=rank, world_size=2)
    loss.backward()
    return loss.item(), p.grad.clone()


def test_real_gloo_collectives_match_one_process():
    out = on_two_gloo_workers(_gathered_loss)
    (q0, p0, n0), (q1, p1, n1) = _batch(1), _batch(2)
    p = torch.cat([p0, p1]).requires_grad_(True)
    single = mmret_loss(torch.cat([q0, q1]), p, torch.cat([n0, n1]))
    single.backward()
    assert (out[0][0] + out[1][0]) / 2 == pytest.approx(single.item(), abs=1e-5)
    # Worker r's gradient on its own positives (from both workers' queries, through the
    # collective's backward), averaged as DDP averages, is the one-process gradient.
    assert torch.allclose(out[0][1] / 2, p.grad[:4], atol=1e-5)
    assert torch.allclose(out[1][1] / 2, p.grad[4:], atol=1e-5)


def _step_batch(seed: int, b: int = 4, h: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    px = lambda *s: torch.randint(0, 256, s, generator=g, dtype=torch.uint8)  # noqa: E731
    ids = torch.randint(1, 98, (b, 16), generator=g)
    return {"query_pixels": px(b, 3, 32, 32), "target_pixels": px(b, 3, 32, 32),
            "negative_pixels": px(b, h, 3, 32, 32), "input_ids": ids,
            "attention_mask": torch.ones_like(ids)}


def _grad_cache_step(world: int, rank: int, chunk: int | None, batch: dict[str, torch.Tensor],
                     ) -> dict[str, torch.Tensor]:
    """One TrainStep on the tiny CLIP, under DDP when ``world`` > 1; the parameters'
    gradients in it."""
    from torch.nn.parallel import DistributedDataParallel

    from megapairs_ray.models.inputs import ModelInput
    from megapairs_ray.train.config import OptimConfig
    from megapairs_ray.train.step import TrainStep

    torch.manual_seed(0)
    core = MMRetCLIP.from_config(**TINY).train()
    model = DistributedDataParallel(core) if world > 1 else core
    # An optimiser step that moves nothing (lr ~ 0, no clipping) and keeps the gradients: the
    # micro-batch's last backward is the one DDP synchronises (averages) in.
    cfg = OptimConfig(max_steps=4, batch_size=len(batch["input_ids"]), lr=1e-30,
                      max_grad_norm=None, grad_cache_chunk=chunk, temperature=0.05)
    step = TrainStep(model, core, cfg, 2, ModelInput(32, 16), torch.device("cpu"),
                     rank=rank, world_size=world)
    step.optimizer.zero_grad = lambda **kw: None  # type: ignore[method-assign]
    step(batch)
    return {n: p.grad.clone() for n, p in core.named_parameters() if p.grad is not None}


def _grad_cache_half(rank):
    return _grad_cache_step(2, rank, 3, _step_batch(rank + 1))


def test_grad_cache_on_two_gloo_workers_equals_one_process_on_the_whole_batch():
    """GradCache in chunks of 3 on two DDP workers, each scoring its queries against both
    workers' candidates: the averaged gradients are one process's on the whole batch, in one
    pass."""
    out = on_two_gloo_workers(_grad_cache_half)
    halves = [_step_batch(1), _step_batch(2)]
    whole = {k: torch.cat([halves[0][k], halves[1][k]]) for k in halves[0]}
    want = _grad_cache_step(1, 0, None, whole)
    assert out[0].keys() == want.keys() and len(want) > 10
    for name, g in want.items():
        assert torch.allclose(out[0][name], g, atol=1e-6, rtol=1e-4), name
        assert torch.allclose(out[1][name], g, atol=1e-6, rtol=1e-4), name
