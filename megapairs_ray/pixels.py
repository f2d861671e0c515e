"""Decoding and model preprocessing as batched tensor ops.

Decode: on the GPU, JPEGs go through nvJPEG (``torchvision.io.decode_jpeg`` on a list, one
batched call); anything else, and any JPEG nvJPEG refuses, falls back to Pillow on a thread pool
(Pillow releases the GIL while decoding). On the CPU everything is Pillow.

Preprocess: torchvision's eval transform (resize the short side to S / crop_fraction, centre-crop
S x S, normalise), reproduced as tensor ops. Images that share a shape are stacked and resized in
one call, so a corpus resized upstream (img2dataset's usual 256 or 512) costs one interpolate per
batch, not one per image. An ``ImageSpec`` can instead ask for the pixels of a processor that
works on 8-bit Pillow images (CLIP's released one): a floored crop offset and an 8-bit resize.
"""

from __future__ import annotations

import ctypes
import io
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from megapairs_ray.imaging import ImageSpec, decode_rgb


class DecodeBudget:
    """Bounds the memory of the decodes running at once in this process.

    Pixel limits per image are not enough: a paletted PNG just under ingest's pixel limit is an
    86 kB file that takes about a gigabyte to decode and convert, and a batch decoded on a thread
    pool holds several at once. Each decode first holds its estimated peak bytes (from the
    header) against this budget, waiting while others hold it; one image larger than the whole
    budget still decodes, alone."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free = max_bytes
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        n = min(max(nbytes, 0), self.max_bytes)
        with self._cond:
            self._cond.wait_for(lambda: self._free >= n)
            self._free -= n
        try:
            yield
        finally:
            with self._cond:
                self._free += n
                self._cond.notify_all()


DEFAULT_DECODE_BUDGET_BYTES = 1 << 30
_budget = DecodeBudget(DEFAULT_DECODE_BUDGET_BYTES)


# glibc keeps large freed blocks in each thread's arena, so after a few huge decodes on a
# thread pool the process holds every thread's worst case at once. Returning them after each
# huge decode keeps the budget a bound on memory, not only on concurrency.
_TRIM_ABOVE_BYTES = 64 << 20


def _release_freed_memory() -> None:
    with suppress(OSError, AttributeError):  # not glibc: nothing to trim this way
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def set_decode_budget(max_bytes: int) -> None:
    """This process's budget (a stage sets it from its config when its actor starts)."""
    global _budget
    _budget = DecodeBudget(max_bytes)


def decode_peak_bytes(data: bytes, min_short_side: int) -> int:
    """Estimated peak bytes of decoding ``data`` with ``decode_rgb``: the decoded image plus the
    RGBA and RGB copies a conversion makes (JPEGs are decoded at reduced scale)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if im.format == "JPEG" and min_short_side:
                scale = max(1, min(w, h) // min_short_side)
                return (w // scale) * (h // scale) * 3 * 2
    except Exception:  # undecodable: decode_rgb reports it, cheaply
        return 0
    return w * h * (1 + 4 + 3)


def decode_cpu(images: Sequence[bytes], min_short_side: int, pool: ThreadPoolExecutor | None,
               transparency: str = "white") -> list[torch.Tensor | Exception]:
    """HWC uint8 tensors (or the exception that stopped each image), decoded within this
    process's ``DecodeBudget``; transparent pixels as ``transparency`` says
    (``imaging.TRANSPARENCY_MODES``)."""

    def one(data: bytes) -> torch.Tensor | Exception:
        peak = decode_peak_bytes(data, min_short_side)
        try:
            with _budget.hold(peak):
                return torch.from_numpy(decode_rgb(data, min_short_side, transparency))
        except Exception as e:  # counted as a reject by the caller
            return e
        finally:
            if peak >= _TRIM_ABOVE_BYTES:
                _release_freed_memory()

    return list(pool.map(one, images)) if pool is not None else [one(b) for b in images]


def decode_gpu(images: Sequence[bytes], jpeg_mask: Sequence[bool], min_short_side: int,
               device: torch.device, pool: ThreadPoolExecutor | None,
               transparency: str = "white") -> list[torch.Tensor | Exception]:
    """HWC uint8 tensors on ``device``: nvJPEG for plain JPEGs (which have no transparency),
    Pillow for the rest."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | Exception | None] = [None] * len(images)
    jpeg_idx = [i for i, m in enumerate(jpeg_mask) if m]
    cpu_idx = [i for i, m in enumerate(jpeg_mask) if not m]
    if jpeg_idx:
        raw = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in jpeg_idx]
        try:
            decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
            for i, t in zip(jpeg_idx, decoded):
                out[i] = t.permute(1, 2, 0)
        except RuntimeError:
            # One bad stream fails the batched call: retry singly, send failures to Pillow.
            for i, r in zip(jpeg_idx, raw):
                try:
                    out[i] = decode_jpeg(r, mode=ImageReadMode.RGB, device=device).permute(1, 2, 0)
                except RuntimeError:
                    cpu_idx.append(i)
    if cpu_idx:
        decoded_cpu = decode_cpu([images[i] for i in cpu_idx], min_short_side, pool, transparency)
        for i, t in zip(cpu_idx, decoded_cpu):
            out[i] = t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t
    return out  # type: ignore[return-value]


def to_model_input(images: Sequence[torch.Tensor], spec: ImageSpec, dtype: torch.dtype,
                   ) -> torch.Tensor:
    """HWC uint8 tensors (any sizes, one device) -> N x 3 x S x S normalised ``dtype``."""
    device = images[0].device
    out = torch.empty((len(images), 3, spec.size, spec.size), dtype=dtype, device=device)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        groups[(im.shape[0], im.shape[1])].append(i)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1) * 255.0
    for (h, w), idx in groups.items():
        stack = torch.stack([images[i] for i in idx]) if len(idx) > 1 else images[idx[0]][None]
        x = stack.permute(0, 3, 1, 2).float()
        new_h, new_w = resized_size(h, w, spec)
        top, left = crop_offsets(new_h, new_w, spec)
        if spec.resize_8bit:  # its columns come back cropped
            x = _resize_8bit(x, new_h, new_w, spec.interpolation, left, spec.size)
            x = x[:, :, top : top + spec.size]
        else:
            if (new_h, new_w) != (h, w):
                x = F.interpolate(x, size=(new_h, new_w), mode=spec.interpolation,
                                  antialias=True, align_corners=False)
            x = x[:, :, top : top + spec.size, left : left + spec.size]
        out[torch.tensor(idx, device=device)] = ((x.clamp_(0, 255) - mean) / std).to(dtype)
    return out


def to_uint8_input(images: Sequence[torch.Tensor], spec: ImageSpec) -> np.ndarray:
    """``to_model_input`` kept in 0..255 as uint8 [n,3,S,S] (``spec`` unnormalised): a quarter
    of the bytes of floats, for pixels that travel (the training loaders' batches) and are
    normalised where they are used."""
    if not images:
        return np.zeros((0, 3, spec.size, spec.size), np.uint8)
    return to_model_input(images, spec, torch.float32).round_().to(torch.uint8).numpy()


def _resize_8bit(x: torch.Tensor, new_h: int, new_w: int, mode: str, left: int, width: int,
                 ) -> torch.Tensor:
    """Pillow's resize of an 8-bit image, on a float batch, keeping only the columns
    ``left:left + width`` of the result (the crop's, the only ones used): the same antialiased
    kernel (torch's antialiased bicubic is Pillow's, a = -0.5), applied as Pillow does,
    horizontally and then vertically, each pass rounded half up to whole levels and clamped.

    The rounding between the passes is what matters: a bicubic overshoot clipped after the first
    pass changes the second, by up to 3 levels on a photo where one float pass is used. Columns
    are cropped between the passes, since the vertical pass treats each column alone: a wide
    image's second pass then costs what a square one's does. A dimension that keeps its size is
    not resampled (Pillow skips that pass too). float32, not Pillow's fixed point: a value that
    is exactly a half (frequent when enlarging by a simple ratio) may round the other way, a
    level off on a few pixels (float64 would avoid it at half the speed)."""
    h, w = x.shape[-2:]
    if new_w != w:
        x = F.interpolate(x, size=(h, new_w), mode=mode, antialias=True, align_corners=False)
        x = x.clamp_(0, 255).add_(0.5).floor_()
    x = x[..., left : left + width]
    if new_h != h:
        x = F.interpolate(x, size=(new_h, x.shape[-1]), mode=mode, antialias=True,
                          align_corners=False)
        x = x.clamp_(0, 255).add_(0.5).floor_()
    return x


def crop_offsets(new_h: int, new_w: int, spec: ImageSpec) -> tuple[int, int]:
    """(top, left) of the centre crop of a resized ``new_h`` x ``new_w`` image."""
    if spec.crop_offset == "floor":
        return (new_h - spec.size) // 2, (new_w - spec.size) // 2
    return round((new_h - spec.size) / 2.0), round((new_w - spec.size) / 2.0)


def resized_size(h: int, w: int, spec: ImageSpec) -> tuple[int, int]:
    """torchvision ``Resize(int)`` on the short side (or a squash to a square)."""
    if spec.resize_mode == "squash":
        return spec.size, spec.size
    short_target = round(spec.size / spec.crop_fraction)
    if h <= w:
        return short_target, int(short_target * w / h)
    return int(short_target * h / w), short_target
