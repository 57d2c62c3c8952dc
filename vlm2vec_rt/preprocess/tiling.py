"""Python face of the C++ tiling (`vlm2vec_rt._C`): validate every argument once, then call native code.

`anyres` gives LLaVA-NeXT's views and `qwen2vl` Qwen2-VL's patches with the same values, views and order
as transformers' `LlavaNextImageProcessorPil` / `Qwen2VLImageProcessorPil` for one image: the resize is
Pillow's bicubic reproduced bit for bit (antialiased when downscaling), and rescale + normalise are a
per-channel table built with exactly the reference's float operations, so float32 outputs are bit-equal
and float16 outputs are the float32 ones rounded. `phi3v` gives Phi-3.5-V's views as its official
`Phi3VImageProcessor` does (Pillow's bilinear resize bit for bit, so its crops are bit-equal; the global
view is torch's bicubic interpolate to float rounding). The native code releases the GIL; the `_batch`
functions spread a list of images over threads.

Inputs are uint8 HxWx3 RGB arrays, contiguous or not (decoding stays in `preprocess.images`).
Anything wrong raises `InputError` before any pixel is read.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _C
from ..errors import InputError
from .images import DEFAULT_MAX_PIXELS, HIGH_RESOLUTION

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (LLaVA-NeXT and Qwen2-VL both use them).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255

# VLM2Vec's "high" resolution: images resized to 1344x1344, then tiled on grids of up to 4x4 views of 336,
# so a 1344x1344 image gives 16 tiles + the base view = 17 views.
HIGH_RESOLUTION_PINPOINTS = tuple((336 * a, 336 * b) for a in range(1, 5) for b in range(1, 5))

MAX_CROP_SIZE = 4096
MAX_GRID_VIEWS = 1024  # tiles per pinpoint: far above any released checkpoint (LLaVA-OneVision: 36)
MAX_RESIZE_TO = 16384

_DTYPES = {
    "float32": "float32",
    "float16": "float16",
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
}

Pinpoints = Sequence[Sequence[int]]


# ---- LLaVA-NeXT anyres -------------------------------------------------------------------------------
def anyres(
    image: np.ndarray,
    *,
    grid_pinpoints: Pinpoints,
    crop_size: int = 336,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    dtype: str = "float32",
    rescale_factor: float = RESCALE_FACTOR,
    resize_to: int | None = None,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """LLaVA-NeXT anyres views of one uint8 HxWx3 image: float [views, 3, crop_size, crop_size].

    View 0 is the whole image resized to crop_size x crop_size; then the tiles, row-major, of the image
    resized (aspect kept) into the best grid resolution (`select_best_resolution` over grid_pinpoints,
    (height, width) pairs, multiples of crop_size) and centred on black padding. views =
    1 + (best_height / crop_size) * (best_width / crop_size); see `anyres_plan`.
    resize_to=N first resizes the image to N x N (VLM2Vec's "high" resolution is N=1344).
    dtype: "float32" (bit-equal to transformers) or "float16" (those values rounded).
    """
    args = _anyres_args(
        grid_pinpoints, crop_size, mean, std, dtype, rescale_factor, resize_to, max_image_pixels
    )
    _check_image(image, "image", max_image_pixels)
    return _native(_C.anyres, image, *args)


def anyres_batch(
    images: Sequence[np.ndarray],
    *,
    num_threads: int = 0,
    grid_pinpoints: Pinpoints,
    crop_size: int = 336,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    dtype: str = "float32",
    rescale_factor: float = RESCALE_FACTOR,
    resize_to: int | None = None,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[np.ndarray]:
    """`anyres` of every image, on num_threads threads (0: every core this process may use), GIL released."""
    pinpoints, crop, lut, square = _anyres_args(
        grid_pinpoints, crop_size, mean, std, dtype, rescale_factor, resize_to, max_image_pixels
    )
    images = _check_images(images, max_image_pixels)
    return _native(_C.anyres_batch, images, pinpoints, crop, lut, _threads(num_threads), square)


def anyres_plan(
    height: int, width: int, *, grid_pinpoints: Pinpoints, crop_size: int = 336
) -> dict[str, Any]:
    """Where an image of height x width lands in the anyres grid, without touching pixels.

    Keys: best (height, width) of the chosen pinpoint, resized (height, width) before padding,
    pad (top, left), grid (rows, cols) of tiles, views (1 + rows * cols).
    """
    for name, v in (("height", height), ("width", width)):
        if not _is_int(v) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    pinpoints = _check_pinpoints(grid_pinpoints, _check_crop(crop_size))
    return _native(_C.anyres_plan, int(height), int(width), pinpoints, int(crop_size))


# ---- Qwen2-VL -----------------------------------------------------------------------------------------
def qwen2vl(
    image: np.ndarray,
    *,
    min_pixels: int,
    max_pixels: int,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    dtype: str = "float32",
    rescale_factor: float = RESCALE_FACTOR,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Qwen2-VL patches of one uint8 HxWx3 image: (pixel_values [h * w, 3 * T * P * P], grid_thw (1, h, w)).

    Smart resize (both sides multiples of patch_size * merge_size, pixel count in [min_pixels, max_pixels],
    aspect ratio kept as well as that allows), then patches in the merge order the vision tower expects,
    each frame repeated temporal_patch_size times. Aspect ratios over 200 are an InputError, as in
    transformers.
    """
    args = _qwen_args(
        min_pixels, max_pixels, patch_size, merge_size, temporal_patch_size, mean, std, dtype, rescale_factor
    )
    _check_image(image, "image", max_image_pixels)
    pixel_values, grid = _native(_C.qwen2vl, image, *args, what=f"image {_size(image)}")
    return pixel_values, tuple(grid)


def qwen2vl_batch(
    images: Sequence[np.ndarray],
    *,
    num_threads: int = 0,
    min_pixels: int,
    max_pixels: int,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    dtype: str = "float32",
    rescale_factor: float = RESCALE_FACTOR,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """`qwen2vl` of every image, on num_threads threads (0: every core this process may use), GIL released."""
    args = _qwen_args(
        min_pixels, max_pixels, patch_size, merge_size, temporal_patch_size, mean, std, dtype, rescale_factor
    )
    images = _check_images(images, max_image_pixels)
    out = _native(_C.qwen2vl_batch, images, *args, _threads(num_threads))
    return [(pv, tuple(grid)) for pv, grid in out]


def qwen2vl_size(
    height: int, width: int, *, min_pixels: int, max_pixels: int, patch_size: int = 14, merge_size: int = 2
) -> tuple[int, int]:
    """Qwen2-VL's smart resize: the (height, width) an image of this size is resized to."""
    for name, v in (("height", height), ("width", width)):
        if not _is_int(v) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    _qwen_args(
        min_pixels, max_pixels, patch_size, merge_size, 1, CLIP_MEAN, CLIP_STD, "float32", RESCALE_FACTOR
    )
    return tuple(
        _native(
            _C.qwen2vl_plan,
            int(height),
            int(width),
            int(patch_size),
            int(merge_size),
            int(min_pixels),
            int(max_pixels),
            what=f"image {width}x{height}",
        )
    )


# ---- Phi-3.5-V -----------------------------------------------------------------------------------------
MAX_PHI3V_CROPS = 64  # the released configurations use 4 and 16


def phi3v(
    image: np.ndarray,
    *,
    num_crops: int = 16,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, tuple[int, int], int]:
    """Phi-3.5-V views of one uint8 HxWx3 image: (pixel_values, image_size, num_img_tokens).

    What the official Phi3VImageProcessor returns for one image (`preprocess.phi3v` is the plain-Python
    reference, step by step): pixel_values float32 [num_crops + 1, 3, 336, 336] = the global view (the
    normalised HD image resized bicubic to 336x336, as torch's interpolate) then the HD image's 336-crops
    row-major, then zero views; image_size (h, w) of the HD image (the image resized Pillow-bilinear to
    whole 336-crops across its long side, padded with white to a multiple of 336 across the other);
    num_img_tokens = (crops + 1) * 144 + 1 + (h // 336 + 1) * 12. The crops are bit-equal to the
    official ones; the global view differs by float rounding (its two 1-D passes run in the other order).
    An aspect ratio so extreme that a side would be resized to 0 pixels is an InputError (the official
    processor fails there too).
    """
    lut = _phi3v_args(num_crops, mean, std)
    _check_image(image, "image", max_image_pixels)
    pixel_values, size, tokens = _native(_C.phi3v, image, int(num_crops), lut)
    return pixel_values, tuple(size), int(tokens)


def phi3v_batch(
    images: Sequence[np.ndarray],
    *,
    num_threads: int = 0,
    num_crops: int = 16,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[tuple[np.ndarray, tuple[int, int], int]]:
    """`phi3v` of every image, on num_threads threads (0: every core this process may use), GIL released."""
    lut = _phi3v_args(num_crops, mean, std)
    images = _check_images(images, max_image_pixels)
    out = _native(_C.phi3v_batch, images, int(num_crops), lut, _threads(num_threads))
    return [(pv, tuple(size), int(tokens)) for pv, size, tokens in out]


def phi3v_plan(height: int, width: int, *, num_crops: int = 16) -> dict[str, Any]:
    """Phi-3.5-V's HD transform of an image of height x width, without touching pixels.

    Keys: transposed (width < height: the official code resizes the transposed image), resized
    (height, width) before padding, pad (top, left) of white before the image, image_size (height, width)
    of the HD image, grid (rows, cols) of 336-crops, num_img_tokens.
    """
    for name, v in (("height", height), ("width", width)):
        if not _is_int(v) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    _check_phi3v_crops(num_crops)
    plan = _native(_C.phi3v_plan, int(height), int(width), int(num_crops), what=f"image {width}x{height}")
    return {k: tuple(v) if isinstance(v, tuple) else v for k, v in plan.items()}


# ---- resize -------------------------------------------------------------------------------------------
def resize(
    image: np.ndarray, height: int, width: int, *, max_image_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """`PIL.Image.resize((width, height), BICUBIC)` of a uint8 HxWx3 image, bit for bit, without the GIL."""
    _check_image(image, "image", max_image_pixels)
    for name, v in (("height", height), ("width", width)):
        if not _is_int(v) or not 1 <= v <= MAX_RESIZE_TO:
            raise InputError(f"resize {name} must be an integer in [1, {MAX_RESIZE_TO}], got {v!r}")
    if height * width > max_image_pixels:
        raise InputError(f"resize to {width}x{height} is over the limit of {max_image_pixels} pixels")
    return _native(_C.resize_bicubic, image, int(height), int(width))


# ---- output memory -------------------------------------------------------------------------------------
def set_buffer_cache(max_bytes: int) -> None:
    """Keep up to max_bytes of freed output arrays (those of 1 MiB and more) for reuse; 0 turns it off.

    A fresh multi-megabyte array costs page faults and the kernel's zeroing of every page, about as much
    as writing the views; recycled memory skips both. Default 1 GiB (a batch of 32 images at 1344x1344 in
    float32 is 740 MiB). Memory is only kept after its arrays are freed.
    """
    if not _is_int(max_bytes) or max_bytes < 0:
        raise InputError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
    _C.set_buffer_cache(int(max_bytes))


def buffer_cache() -> tuple[int, int]:
    """(bytes of freed output memory kept now, the limit)."""
    return tuple(_C.buffer_cache())


# ---- transformers processor configurations --------------------------------------------------------------
_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the resample both processors use


def llava_next_options(image_processor: Any) -> dict[str, Any]:
    """`anyres` keywords reproducing a `LlavaNextImageProcessor(Pil)` configuration.

    InputError names the setting when the configuration is one the C++ tiling does not reproduce (then
    use the transformers processor).
    """
    p = image_processor
    _require_standard(p, "LLaVA-NeXT")
    crop = p.crop_size
    side = crop.height if crop is not None else None
    if side is None or crop.width != side:
        raise InputError(f"LLaVA-NeXT processor crop_size {crop} is not square: use tiling='transformers'")
    size = p.size
    squared = (size.height, size.width) if size.height and size.width else (size.shortest_edge,) * 2
    if squared != (side, side):
        raise InputError(
            f"LLaVA-NeXT processor size {size} differs from crop_size {side}: use tiling='transformers'"
        )
    return dict(
        grid_pinpoints=[tuple(pp) for pp in p.image_grid_pinpoints],
        crop_size=int(side),
        mean=tuple(p.image_mean),
        std=tuple(p.image_std),
        rescale_factor=float(p.rescale_factor),
    )


def qwen2vl_options(image_processor: Any) -> dict[str, Any]:
    """`qwen2vl` keywords reproducing a `Qwen2VLImageProcessor(Pil)` configuration (InputError if it cannot)."""
    p = image_processor
    _require_standard(p, "Qwen2-VL")
    if not (p.size.shortest_edge and p.size.longest_edge):
        raise InputError(f"Qwen2-VL processor size {p.size} has no min/max pixels: use tiling='transformers'")
    return dict(
        min_pixels=int(p.size.shortest_edge),
        max_pixels=int(p.size.longest_edge),
        patch_size=int(p.patch_size),
        merge_size=int(p.merge_size),
        temporal_patch_size=int(p.temporal_patch_size),
        mean=tuple(p.image_mean),
        std=tuple(p.image_std),
        rescale_factor=float(p.rescale_factor),
    )


def _require_standard(p: Any, name: str) -> None:
    for flag in ("do_resize", "do_rescale", "do_normalize"):
        if not getattr(p, flag, False):
            raise InputError(
                f"{name} processor has {flag}=False, which the C++ tiling does not do: use tiling='transformers'"
            )
    if int(p.resample) != _BICUBIC:
        raise InputError(
            f"{name} processor resamples with {p.resample!r}, not bicubic: use tiling='transformers'"
        )


# ---- validation ---------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _size(image: Any) -> str:
    shape = getattr(image, "shape", None)
    return f"{shape[1]}x{shape[0]}" if shape is not None and len(shape) >= 2 else "?"


def _check_image(image: Any, what: str, max_image_pixels: int) -> None:
    if not _is_int(max_image_pixels) or max_image_pixels < 1:
        raise InputError(f"max_image_pixels must be a positive integer, got {max_image_pixels!r}")
    if not isinstance(image, np.ndarray):
        raise InputError(f"{what}: expected a uint8 HxWx3 numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InputError(
            f"{what}: expected dtype uint8, got {image.dtype} (load it with preprocess.images.load_image)"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"{what}: expected shape (H, W, 3), got {image.shape}")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise InputError(f"{what} is empty ({w}x{h})")
    if h * w > max_image_pixels:
        raise InputError(f"{what} has {w}x{h} = {w * h} pixels, over the limit of {max_image_pixels}")


def _check_images(images: Any, max_image_pixels: int) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) or not isinstance(images, Sequence):
        raise InputError(f"images must be a list of uint8 HxWx3 arrays, got {type(images).__name__}")
    images = list(images)
    for i, image in enumerate(images):
        _check_image(image, f"image {i}", max_image_pixels)
    return images


def _check_crop(crop_size: Any) -> int:
    if not _is_int(crop_size) or not 1 <= crop_size <= MAX_CROP_SIZE:
        raise InputError(f"crop_size must be an integer in [1, {MAX_CROP_SIZE}], got {crop_size!r}")
    return int(crop_size)


def _check_pinpoints(grid_pinpoints: Any, crop: int) -> list[tuple[int, int]]:
    if isinstance(grid_pinpoints, (str, bytes)) or not isinstance(grid_pinpoints, (Sequence, np.ndarray)):
        raise InputError(f"grid_pinpoints must be a list of (height, width) pairs, got {grid_pinpoints!r}")
    out = []
    for p in grid_pinpoints:
        if isinstance(p, (str, bytes)) or not isinstance(p, (Sequence, np.ndarray)) or len(p) != 2:
            raise InputError(f"grid pinpoint {p!r} is not a (height, width) pair")
        h, w = p
        if not (_is_int(h) and _is_int(w)) or h < 1 or w < 1:
            raise InputError(f"grid pinpoint {p!r}: height and width must be positive integers")
        if h % crop or w % crop:
            raise InputError(f"grid pinpoint {p!r} is not a multiple of crop_size {crop}")
        if (h // crop) * (w // crop) > MAX_GRID_VIEWS:
            raise InputError(
                f"grid pinpoint {p!r} gives {(h // crop) * (w // crop)} tiles (limit {MAX_GRID_VIEWS})"
            )
        out.append((int(h), int(w)))
    if not out:
        raise InputError("grid_pinpoints is empty")
    return out


def _check_triple(v: Any, name: str) -> tuple[float, float, float]:
    try:
        t = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be 3 numbers (one per channel), got {v!r}") from None
    if len(t) != 3 or not all(math.isfinite(x) for x in t):
        raise InputError(f"{name} must be 3 finite numbers (one per channel), got {v!r}")
    return t


def _lut_for(mean: Any, std: Any, rescale_factor: Any, dtype: Any) -> np.ndarray:
    try:
        out_dtype = _DTYPES[dtype if isinstance(dtype, str) else np.dtype(dtype)]
    except (KeyError, TypeError):
        raise InputError(f"dtype must be 'float32' or 'float16', got {dtype!r}") from None
    mean, std = _check_triple(mean, "mean"), _check_triple(std, "std")
    if any(np.float32(s) == 0 for s in std):
        raise InputError(f"std must not be zero, got {std!r}")
    if not isinstance(rescale_factor, numbers.Real) or not math.isfinite(rescale_factor):
        raise InputError(f"rescale_factor must be a finite number, got {rescale_factor!r}")
    return _lut(mean, std, float(rescale_factor), out_dtype)


@functools.lru_cache(maxsize=64)
def _lut(mean: tuple, std: tuple, rescale_factor: float, dtype: str) -> np.ndarray:
    """[3, 256] output value of each channel value, with transformers' exact operations: rescale in float64
    cast to float32 (`image_transforms.rescale`), then (x - mean) / std in float32 (`normalize`)."""
    x = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    lut = np.ascontiguousarray(((x[None, :] - m) / s).astype(dtype))
    lut.setflags(write=False)
    return lut


def _anyres_args(grid_pinpoints, crop_size, mean, std, dtype, rescale_factor, resize_to, max_image_pixels):
    crop = _check_crop(crop_size)
    pinpoints = _check_pinpoints(grid_pinpoints, crop)
    if resize_to is not None and (not _is_int(resize_to) or not 1 <= resize_to <= MAX_RESIZE_TO):
        raise InputError(f"resize_to must be None or an integer in [1, {MAX_RESIZE_TO}], got {resize_to!r}")
    if resize_to is not None and resize_to * resize_to > max_image_pixels:
        raise InputError(
            f"resize_to={resize_to} makes {resize_to**2} pixels, over the limit of {max_image_pixels}"
        )
    return pinpoints, crop, _lut_for(mean, std, rescale_factor, dtype), int(resize_to or 0)


def _qwen_args(
    min_pixels, max_pixels, patch_size, merge_size, temporal_patch_size, mean, std, dtype, rescale_factor
):
    for name, v, top in (
        ("min_pixels", min_pixels, 1 << 26),
        ("max_pixels", max_pixels, 1 << 40),
        ("patch_size", patch_size, 1024),
        ("merge_size", merge_size, 64),
        ("temporal_patch_size", temporal_patch_size, 64),
    ):
        if not _is_int(v) or not 1 <= v <= top:
            raise InputError(f"{name} must be an integer in [1, {top}], got {v!r}")
    lut = _lut_for(mean, std, rescale_factor, dtype)
    return int(patch_size), int(merge_size), int(temporal_patch_size), int(min_pixels), int(max_pixels), lut


def _check_phi3v_crops(num_crops: Any) -> None:
    if not _is_int(num_crops) or not 1 <= num_crops <= MAX_PHI3V_CROPS:
        raise InputError(f"num_crops must be an integer in [1, {MAX_PHI3V_CROPS}], got {num_crops!r}")


def _phi3v_args(num_crops: Any, mean: Any, std: Any) -> np.ndarray:
    """The float32 table of ToTensor + Normalize: float32(x) / 255 (the same float32 values as the
    rescale of `_lut` for every x, checked by the tests), then (x - mean) / std in float32."""
    _check_phi3v_crops(num_crops)
    return _lut_for(mean, std, RESCALE_FACTOR, "float32")


def _threads(num_threads: Any) -> int:
    if not _is_int(num_threads) or num_threads < 0:
        raise InputError(f"num_threads must be an integer >= 0 (0: all cores), got {num_threads!r}")
    if num_threads == 0:
        # The cores this process may run on (containers and taskset limit them), not the machine's.
        try:
            return len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return _C.hardware_threads()
    return int(num_threads)


def _native(fn, *args, what: str | None = None):
    """Call into _C; its own checks (a second line of defence) raise ValueError -> InputError."""
    try:
        return fn(*args)
    except ValueError as e:
        raise InputError(f"{what}: {e}" if what else str(e)) from None


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "HIGH_RESOLUTION",
    "HIGH_RESOLUTION_PINPOINTS",
    "MAX_PHI3V_CROPS",
    "RESCALE_FACTOR",
    "anyres",
    "anyres_batch",
    "anyres_plan",
    "buffer_cache",
    "llava_next_options",
    "phi3v",
    "phi3v_batch",
    "phi3v_plan",
    "qwen2vl",
    "qwen2vl_batch",
    "qwen2vl_options",
    "qwen2vl_size",
    "resize",
    "set_buffer_cache",
]
