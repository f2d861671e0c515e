"""Image checks and decoding on the CPU with Pillow.

``inspect_image`` is ingest's gate: it reads the header, guards sizes *before* any pixel is
decoded (decompression bombs), and verifies the whole compressed stream cheaply — a JPEG is
decoded at 1/8 scale, which still walks every entropy-coded block, so truncation and corruption
surface at a fraction of a full decode's cost. ``decode_rgb`` turns any accepted image into 8-bit
RGB the models can take, at no more resolution than they need.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from megapairs_ray.reasons import Reason

# Our own pixel guard runs before decoding; Pillow's would raise on exactly what we want to
# count as a reject, and never load truncated data as if it were whole.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow's advisory warnings (palette transparency, EXIF oddities) say nothing a reject reason
# does not; filtered once here because ``warnings.catch_warnings`` is not thread-safe and
# decoding runs on thread pools.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")

PLAIN_MODES = frozenset({"RGB", "L"})


@dataclass(frozen=True)
class ImageInfo:
    format: str
    mode: str
    width: int
    height: int


@dataclass(frozen=True)
class Verdict:
    info: ImageInfo | None
    reason: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None


def inspect_image(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    min_side: int,
    max_aspect_ratio: float,
    unusual_modes: str = "convert",
    verify_decode: bool = True,
) -> Verdict:
    """Accept or reject one encoded image, with the reason."""
    if not isinstance(data, (bytes, bytearray)):
        return Verdict(None, Reason.NOT_AN_IMAGE, f"payload is {type(data).__name__}, not bytes")
    if not data:
        return Verdict(None, Reason.EMPTY_BYTES, "0 bytes")
    if len(data) > max_bytes:
        return Verdict(None, Reason.TOO_MANY_BYTES, f"{len(data)} bytes > {max_bytes}")
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as e:  # Pillow raises many types on hostile headers
        # An image format's signature with a header Pillow cannot parse is a damaged image;
        # anything else is not an image at all.
        reason = Reason.CORRUPT_IMAGE if _has_image_signature(data) else Reason.NOT_AN_IMAGE
        if isinstance(e, UnidentifiedImageError):
            return Verdict(None, reason, f"unreadable header {data[:8]!r}")
        return Verdict(None, reason, f"{type(e).__name__}: {e}")
    with im:
        w, h = im.size
        info = ImageInfo(format=im.format or "?", mode=im.mode, width=w, height=h)
        if w * h > max_pixels:
            return Verdict(info, Reason.TOO_MANY_PIXELS, f"{w}x{h} > {max_pixels} pixels")
        if min(w, h) < min_side:
            return Verdict(info, Reason.TOO_SMALL, f"{w}x{h}, shorter side < {min_side}")
        if max(w, h) > max_aspect_ratio * min(w, h):
            return Verdict(info, Reason.EXTREME_ASPECT, f"{w}x{h}, aspect > {max_aspect_ratio}")
        if _is_unusual(im) and unusual_modes == "reject":
            return Verdict(info, Reason.UNUSUAL_MODE, f"mode {im.mode}")
        if verify_decode:
            try:
                if im.format == "JPEG":
                    im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
                im.load()
            except Exception as e:
                return Verdict(info, Reason.CORRUPT_IMAGE, f"{type(e).__name__}: {e}")
    return Verdict(info)


_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00",
               b"MM\x00*")


def _has_image_signature(data: bytes) -> bool:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return False
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _is_unusual(im: Image.Image) -> bool:
    return im.mode not in PLAIN_MODES or "transparency" in im.info


# What becomes of transparent pixels. "white" composites them on white: a transparent logo
# looks as it does on a web page, which is what the pipeline's own encoders and our towers
# family are fed. "drop" is Pillow's plain ``convert("RGB")``, the conversion CLIP's released
# processor applies: alpha is ignored (each pixel keeps its stored colour, often black) and a
# paletted image's transparent entries show their palette colour. A model trained on one sees
# the other as different pixels, so each retriever family names the one its weights expect.
TRANSPARENCY_MODES = ("white", "drop")

_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_rgb(im: Image.Image, transparency: str = "white") -> Image.Image:
    """8-bit RGB from any Pillow mode: 16-bit and wider greyscale scaled to 8 bits (whichever
    ``transparency``: Pillow's own conversion clips them, turning most pixels white), CMYK and the
    rest converted, transparency as ``transparency`` says (``TRANSPARENCY_MODES``)."""
    if transparency not in TRANSPARENCY_MODES:
        raise ValueError(f"transparency must be one of {TRANSPARENCY_MODES}, not {transparency!r}")
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in _WIDE_GREY_MODES:
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if transparency == "drop":
        try:
            return im.convert("RGB")
        except ValueError:  # a premultiplied mode Pillow converts only by way of RGBA
            return im.convert("RGBA").convert("RGB")
    if im.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def decode_rgb(data: bytes, min_short_side: int | None = None, transparency: str = "white",
               ) -> np.ndarray:
    """Decode to an HxWx3 uint8 array, shrunk (never below ``min_short_side``) where cheap;
    transparent pixels as ``transparency`` says (``to_rgb``).

    JPEG uses DCT-domain scaling (``draft``); other formats are box-reduced by an integer factor.
    Both keep the shorter side >= ``min_short_side`` so the model-side resize only ever shrinks.
    """
    im = Image.open(io.BytesIO(data))
    if min_short_side and im.format == "JPEG":
        w, h = im.size
        scale = max(1, min(w, h) // min_short_side)
        im.draft("RGB", (max(1, w // scale), max(1, h // scale)))
    im.load()
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    im = to_rgb(im, transparency)
    if min_short_side:
        factor = min(im.size) // min_short_side
        if factor >= 2:
            im = im.reduce(factor)
    return np.array(im, dtype=np.uint8)  # owned and writable: torch wraps it without a copy


# How an image model wants its pixels: a plain description, here beside the decoding so that
# the model side (``models/inputs.py``) can name it without importing torch.
CROP_OFFSETS = ("round", "floor")


@dataclass(frozen=True)
class ImageSpec:
    """How one image model wants its pixels, as torchvision's eval transforms define it:
    ``shortest`` resizes the short side to ``size / crop_fraction`` and centre-crops
    ``size`` x ``size``; ``squash`` resizes straight to ``size`` x ``size``. Then normalised with
    ``mean``/``std`` (in [0, 1] units).

    ``crop_offset``: where the centre crop starts when the margin is odd. ``round`` rounds half
    the margin (torchvision's CenterCrop); ``floor`` floors it (the Hugging Face image
    processors): a one-pixel shift between the two on about a quarter of non-square images.

    ``resize_8bit``: resize as Pillow resizes an 8-bit image (the PIL-based processors, which
    produced the released CLIP models' numbers): the horizontal pass, then the vertical one,
    each rounded to whole levels and clamped to 0..255. Off: one float pass, nothing rounded."""

    size: int
    crop_fraction: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    crop_offset: str = "round"
    resize_8bit: bool = False

    def __post_init__(self) -> None:
        if self.crop_offset not in CROP_OFFSETS:
            raise ValueError(f"crop_offset must be one of {CROP_OFFSETS}, "
                             f"not {self.crop_offset!r}")

    @property
    def min_source_side(self) -> int:
        """The short side a decoded image needs so that resizing only ever shrinks."""
        return round(self.size / self.crop_fraction)
