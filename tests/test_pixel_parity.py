"""Pixel parity of each retriever family with the preprocessing its weights were made with.

The CLIP family's model input, as ``RetrieverEncoder`` makes it (the one path eval, the gallery
and the service embed through), is compared with Hugging Face's CLIP image processors set up as
the checkpoint's (size, mean, std) and fed what a user's code feeds them, ``Image.open(...)``:
``CLIPImageProcessorPil`` (Pillow: the path transformers 4.x ran, which produced the released
models' numbers) and ``CLIPImageProcessor`` (transformers 5's torchvision backend). The images
are the awkward ones: odd sizes (odd crop margins), extreme aspect ratios, greyscale, palettes with
and without a transparent entry, greyscale with alpha, RGBA with partly and wholly transparent
regions whose hidden colours differ, and an image that must be enlarged.

One 8-bit level is 1 / (255 * std) in normalised units: 0.0150 for the smallest CLIP std. Our
resize is Pillow's kernel and rounding computed in float32, where Pillow uses fixed point: a value
that is exactly a half (frequent when enlarging by a simple ratio, 64 -> 224 here) may round the
other way, so a few pixels differ by a level, and where that level feeds the second pass by two.
The torchvision backend's own 8-bit kernel differs from Pillow by up to two levels, and so from
us. Measured (both sizes, every image): against Pillow at most 2 levels, on at most 1.0 % of the
values of one image (the greyscale-alpha one enlarged 3.5 times), mean 0.00015; against
torchvision at most 2 levels, on at most 1.8 %, mean 0.00026.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from megapairs_ray.imaging import ImageSpec, decode_rgb
from megapairs_ray.models.inputs import ModelInput
from megapairs_ray.models.mmret import MMRetCLIP
from megapairs_ray.models.retriever import RetrieverEncoder
from megapairs_ray.models.tokenizer import load_tokenizer
from megapairs_ray.models.towers import towers_model_input
from megapairs_ray.pixels import decode_cpu, to_model_input

from .helpers import encode
from .train_helpers import TINY_CLIP

LEVEL = 1 / (255 * 0.26130258)  # one 8-bit level, in normalised units, at CLIP's smallest std
MAX_DIFF = 2 * LEVEL + 1e-4  # both processors (see above)
SHARE_DIFFERENT = {"pil": 0.015, "torchvision": 0.025}  # of one image's values
MEAN_DIFF = {"pil": 0.0003, "torchvision": 0.0005}


def texture(seed: int, w: int, h: int) -> Image.Image:
    """Random 3x3-pixel blocks with hard edges: bicubic overshoots at every edge, so clamping
    and rounding (between and after the passes) show, as they do on text and line art."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, -(-h // 3)), max(2, -(-w // 3)), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.NEAREST)


def alpha_ramp(w: int, h: int) -> np.ndarray:
    """Alpha 0 on the left third (the hidden colours differ from pixel to pixel), a ramp
    across the middle, opaque on the right."""
    a = np.clip((np.arange(w) - w / 3) / (w / 3), 0, 1) * 255
    return np.broadcast_to(a.round().astype(np.uint8), (h, w)).copy()


def images() -> dict[str, bytes]:
    palette = texture(8, 90, 61).quantize(colors=16)
    rgba = np.dstack([np.asarray(texture(10, 150, 101)), alpha_ramp(150, 101)])
    la = np.dstack([np.asarray(texture(11, 64, 97).convert("L")), alpha_ramp(64, 97)])
    return {
        "jpeg_500x333": encode(texture(1, 500, 333), "JPEG", quality=92),
        "odd_33x47": encode(texture(2, 33, 47), "PNG"),
        "odd_301x199": encode(texture(3, 301, 199), "PNG"),
        "wide_600x9": encode(texture(4, 600, 9), "PNG"),
        "tall_7x400": encode(texture(5, 7, 400), "PNG"),
        "small_20x15": encode(texture(6, 20, 15), "PNG"),  # enlarged at either size
        "grey_L_123x77": encode(texture(7, 123, 77).convert("L"), "PNG"),
        "palette_P": encode(palette, "PNG"),
        "palette_P_transparent": encode(palette, "PNG", transparency=3),
        "grey_alpha_LA": encode(Image.fromarray(la, "LA"), "PNG"),
        "rgba_transparent": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
    }


IMAGES = images()
TRANSPARENT = ("palette_P_transparent", "grey_alpha_LA", "rgba_transparent")


def clip_checkpoint(folder, size: int) -> str:
    """A random-initialised MMRet-CLIP of ``size`` px in HF form (the tests' tiny one, its patch
    grown with the image so 224 stays cheap)."""
    vision = {**TINY_CLIP["vision_config"], "image_size": size, "patch_size": size // 4}
    torch.manual_seed(0)
    MMRetCLIP.from_config(**{**TINY_CLIP, "vision_config": vision}).save_pretrained(folder)
    load_tokenizer(None).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=[32, 224], ids=["32px", "224px"])
def encoder(request, tmp_path_factory) -> RetrieverEncoder:
    folder = tmp_path_factory.mktemp(f"clip{request.param}")
    return RetrieverEncoder(clip_checkpoint(folder, request.param), threads=2)


def processor(kind: str, mi: ModelInput):
    """Hugging Face's CLIP processor as a released checkpoint configures it, at ``mi``."""
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    cls = CLIPImageProcessorPil if kind == "pil" else CLIPImageProcessor
    return cls(size={"shortest_edge": mi.image_size},
               crop_size={"height": mi.image_size, "width": mi.image_size},
               image_mean=list(mi.mean), image_std=list(mi.std))


def reference(kind: str, mi: ModelInput, data: bytes) -> torch.Tensor:
    proc = processor(kind, mi)
    return proc(Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("kind", ["pil", "torchvision"])
def test_clip_pixels_are_the_released_processors(encoder, kind):
    names = sorted(IMAGES)
    ours = encoder.pixels_of([IMAGES[n] for n in names])  # one batch, as eval embeds
    mi = encoder.model.model_input
    assert ours.shape == (len(names), 3, mi.image_size, mi.image_size)
    for name, row in zip(names, ours):
        diff = (row - reference(kind, mi, IMAGES[name])).abs()
        assert diff.max() <= MAX_DIFF, (name, float(diff.max()))
        assert (diff > LEVEL / 2).float().mean() <= SHARE_DIFFERENT[kind], name
        assert diff.mean() <= MEAN_DIFF[kind], (name, float(diff.mean()))


def test_the_previous_pixels_would_fail(encoder):
    """Before: transparency composited on white, torchvision's rounded crop offset, one float
    resize. The test above would have failed on the transparent images by far more than
    rounding, and on an odd crop margin (33x47) by a one-pixel shift."""
    mi = encoder.model.model_input
    old_spec = ImageSpec(size=mi.image_size, crop_fraction=1.0, mean=mi.mean, std=mi.std)
    for name, at_least in [*((n, 1.0) for n in TRANSPARENT), ("odd_33x47", 0.1)]:
        old = to_model_input(decode_cpu([IMAGES[name]], 0, None), old_spec, torch.float32)[0]
        assert (old - reference("pil", mi, IMAGES[name])).abs().max() > at_least, name


def test_clip_family_shows_hidden_colours_as_pillow_does():
    """A wholly transparent pixel keeps its stored colour; a palette's transparent entry its
    palette colour: what ``convert("RGB")`` gives, what the released models were fed."""
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    arr = decode_rgb(encode(Image.fromarray(rgba, "RGBA"), "PNG"), transparency="drop")
    assert (arr == (10, 200, 30)).all()
    pal = Image.open(io.BytesIO(IMAGES["palette_P_transparent"]))
    colour = pal.getpalette()[9:12]
    arr = decode_rgb(IMAGES["palette_P_transparent"], transparency="drop")
    mask = np.asarray(pal) == 3
    assert mask.any() and (arr[mask] == colour).all()


def test_clip_family_still_scales_sixteen_bit():
    """Pillow's own conversion clips 16-bit greyscale (nearly everything turns white); the CLIP
    family keeps our scaling, the one place it departs from the released processor."""
    base = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    arr = decode_rgb(encode(Image.fromarray(base), "PNG"), transparency="drop")
    assert arr.min() <= 2 and arr.max() >= 253 and 100 < arr.mean() < 155


def test_towers_family_keeps_its_own_preprocessing():
    """Ours, a timm-style eval transform: transparency on white, torchvision's rounded crop,
    one float resize: the same spec the pipeline's encoders use by default."""
    mi = towers_model_input({"image_size": 32, "max_text_len": 16,
                             "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)})
    assert (mi.transparency, mi.crop_offset, mi.resize_8bit) == ("white", "round", False)
    assert mi.image_spec() == ImageSpec(32, 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)  # wholly transparent: white, whatever the hidden colour
    data = encode(Image.fromarray(rgba, "RGBA"), "PNG")
    px = to_model_input(decode_cpu([data], 0, None, mi.transparency), mi.image_spec(),
                        torch.float32)
    assert torch.allclose(px, torch.ones_like(px))  # white, normalised with 0.5 / 0.5


def test_training_pixels_are_the_familys():
    """The loaders' spec (identity normalisation) is the family's, so a model trains on the
    pixels it is evaluated on."""
    mi = ModelInput(image_size=32, max_text_len=16)
    spec = mi.image_spec(normalise=False)
    assert (spec.crop_offset, spec.resize_8bit, spec.mean) == ("floor", True, (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="transparency"):
        ModelInput(image_size=32, max_text_len=16, transparency="black")
    with pytest.raises(ValueError, match="crop_offset"):
        ImageSpec(32, 1.0, (0.0,) * 3, (1.0,) * 3, crop_offset="ceil")  # type: ignore[arg-type]
