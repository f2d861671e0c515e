import numpy as np
import pytest
from PIL import Image

from megapairs_ray.imaging import decode_rgb, inspect_image
from tests.helpers import awkward_images, bad_images, encode, jpeg

LIMITS = {"max_bytes": 10 * 1024**2, "max_pixels": 50_000_000, "min_side": 16,
          "max_aspect_ratio": 8.0}


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_images_are_rejected_with_their_reason(name):
    data, reason = bad_images()[name]
    verdict = inspect_image(data, **LIMITS)
    assert not verdict.ok
    assert verdict.reason == reason
    assert verdict.detail


def test_size_guard_runs_before_decoding():
    data, _ = bad_images()["bomb"]
    # 144 Mpx of 1-bit pixels would take seconds and >100 MB to decode; the guard reads only the
    # header, so the reject is immediate even with verification on.
    verdict = inspect_image(data, **LIMITS, verify_decode=True)
    assert verdict.reason == "too_many_pixels"
    assert verdict.info.width == 12_000


def test_too_many_bytes():
    verdict = inspect_image(jpeg(1), **{**LIMITS, "max_bytes": 100})
    assert verdict.reason == "too_many_bytes"


@pytest.mark.parametrize("name", ["cmyk", "rgba", "palette", "gray16", "gray"])
def test_awkward_modes_convert_by_default(name):
    data = awkward_images()[name]
    verdict = inspect_image(data, **LIMITS)
    assert verdict.ok, verdict
    arr = decode_rgb(data)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    assert arr.shape[:2] == (verdict.info.height, verdict.info.width)
    assert 20 < arr.mean() < 250  # not blank, not garbage-black


@pytest.mark.parametrize("name", ["cmyk", "rgba", "palette", "gray16"])
def test_awkward_modes_can_be_rejected(name):
    verdict = inspect_image(awkward_images()[name], **LIMITS, unusual_modes="reject")
    assert verdict.reason == "unusual_mode"


def test_plain_modes_are_not_unusual():
    for name in ("gray",):
        assert inspect_image(awkward_images()[name], **LIMITS, unusual_modes="reject").ok
    assert inspect_image(jpeg(4), **LIMITS, unusual_modes="reject").ok


def test_alpha_is_composited_on_white():
    arr = decode_rgb(awkward_images()["rgba"])
    left = arr[:, : arr.shape[1] // 2 - 1]
    assert (left == 255).all()  # the transparent half is white, not black
    assert arr[:, arr.shape[1] // 2 + 1 :].mean() < 250


def test_sixteen_bit_is_scaled_not_clipped():
    base = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    arr = decode_rgb(encode(Image.fromarray(base), "PNG"))
    assert arr.min() <= 2 and arr.max() >= 253  # full range, not saturated at 255


def test_decode_shrinks_large_images_but_never_below_the_requested_side():
    data = jpeg(5, (1600, 1200))
    arr = decode_rgb(data, min_short_side=256)
    assert min(arr.shape[:2]) >= 256
    assert min(arr.shape[:2]) < 1200
    assert decode_rgb(data).shape[:2] == (1200, 1600)
