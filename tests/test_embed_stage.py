import numpy as np
import pytest
import torch
from PIL import Image

from megapairs_ray import pixels
from megapairs_ray.config import EmbedConfig
from megapairs_ray.imaging import ImageSpec
from megapairs_ray.stages.embed import EmbedStage
from tests.helpers import TINY_EMBED, awkward_images, jpeg, photo


@pytest.fixture(scope="module")
def stage():
    torch.manual_seed(0)
    return EmbedStage(EmbedConfig(**TINY_EMBED))


def _batch(images, captions):
    n = len(images)
    return {"image_id": np.arange(n, dtype=np.int64), "shard": np.array(["s"] * n, dtype=object),
            "image": np.array(images, dtype=object), "caption": np.array(captions, dtype=object),
            "format": np.array(["JPEG"] * n, dtype=object),
            "mode": np.array(["RGB"] * n, dtype=object)}


@pytest.mark.parametrize("size", [(300, 200), (333, 250), (200, 301), (64, 64), (1200, 900)])
@pytest.mark.parametrize("crop_fraction", [1.0, 0.875])
def test_preprocess_equals_torchvision_eval_transform(size, crop_fraction):
    """Same pixels as torchvision's Resize(short side) + CenterCrop + Normalize."""
    from torchvision.transforms import v2

    im = torch.from_numpy(np.array(photo(7, size)))
    spec = ImageSpec(size=64, crop_fraction=crop_fraction, mean=(0.5, 0.4, 0.3),
                     std=(0.25, 0.2, 0.3))
    ours = pixels.to_model_input([im], spec, torch.float32)[0]
    ref = v2.Compose([
        v2.Resize(round(64 / crop_fraction), interpolation=v2.InterpolationMode.BICUBIC,
                  antialias=True),
        v2.CenterCrop(64),
    ])(im.permute(2, 0, 1).float()).clamp(0, 255) / 255.0
    ref = v2.Normalize(spec.mean, spec.std)(ref)
    assert ours.shape == (3, 64, 64)
    assert torch.allclose(ours, ref, atol=1e-4)


def test_preprocess_agrees_with_pil_reference():
    """And close to the PIL pipeline CLIP's own transforms use (bicubic filters differ a bit)."""
    im = photo(7, (300, 200))
    spec = ImageSpec(size=64, crop_fraction=0.875, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    ours = pixels.to_model_input([torch.from_numpy(np.array(im))], spec, torch.float32)[0]
    short = round(64 / 0.875)
    ref = im.resize((int(300 * short / 200), short), Image.Resampling.BICUBIC)
    left, top = round((ref.width - 64) / 2), round((ref.height - 64) / 2)
    ref = np.asarray(ref.crop((left, top, left + 64, top + 64)), dtype=np.float32)
    ref = (torch.from_numpy(ref).permute(2, 0, 1) - 127.5) / 63.75
    assert (ours - ref).abs().mean() < 0.05


def test_batch_of_mixed_shapes_equals_one_by_one():
    spec = ImageSpec(size=32, crop_fraction=1.0, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    ims = [torch.from_numpy(np.array(photo(i, s))) for i, s in
           enumerate([(64, 48), (48, 64), (64, 48), (50, 50)])]
    together = pixels.to_model_input(ims, spec, torch.float32)
    alone = torch.cat([pixels.to_model_input([t], spec, torch.float32) for t in ims])
    assert torch.allclose(together, alone, atol=1e-5)


def test_outputs_are_unit_fp16_and_batch_independent(stage):
    images = [jpeg(i, (96 + 8 * i, 72)) for i in range(6)]
    caps = [f"a picture of thing {i}" for i in range(6)]
    out = stage(_batch(images, caps))
    for space in ("clip_image", "dino_image", "clip_text"):
        v = out[space]
        assert v.dtype == np.float16 and v.shape == (6, stage.dims[space])
        assert np.allclose(np.linalg.norm(v.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert (out["status"] == "").all() and out["has_text"].all()
    # The same image embeds the same wherever it sits in a batch.
    alone = stage(_batch(images[3:4], caps[3:4]))
    for space in ("clip_image", "dino_image", "clip_text"):
        assert np.allclose(alone[space][0], out[space][3], atol=2e-3)
    # Different images differ.
    assert not np.allclose(out["clip_image"][0], out["clip_image"][1], atol=1e-2)


def test_undecodable_rows_and_missing_captions_do_not_fail_the_batch(stage):
    images = [jpeg(1), b"\xff\xd8\xff garbage", awkward_images()["rgba"], jpeg(2)]
    out = stage(_batch(images, ["one", "two", "three", None]))
    assert out["status"].tolist() == ["", "decode_failed", "", ""]
    assert "garbage" not in out["detail"][0] and out["detail"][1]
    assert out["has_text"].tolist() == [True, False, True, False]
    assert not out["clip_image"][1].any()
    assert np.abs(out["clip_image"][2]).sum() > 0
