"""Image loading and validation: anything `Item.image` accepts becomes a contiguous uint8 HxWx3 RGB array.

Every format problem becomes an `InputError` that names the source. Conversions (documented, never
silent failures): palette, CMYK, grey, 1-bit -> RGB; alpha and palette transparency are composited onto
white (as transformers' `convert_to_rgb` does, which also leaves an RGB image's colour key unapplied); 16-bit and 32-bit integer images are scaled to 8 bits;
float images are taken as [0, 1] when their maximum is <= 1, else as [0, 255], and clipped.

An image given as a path, bytes or a PIL image is turned upright by its EXIF orientation first, as
transformers' `load_image` does (what a person sees is what is embedded). A `StoredImage` path is decoded as
stored, with no EXIF orientation: MMEB evaluation reads its images that way, as the official VLM2Vec code
does (a plain `Image.open`).

A resize asked of `load_image` (VLM2Vec's "high" resolution) is done the way the official VLM2Vec code does
it: `Image.resize` on the image as decoded, in its own mode, before any conversion, so a palette or 1-bit
image is resized nearest-neighbour and an RGBA one with premultiplied alpha. RGB and grey images, where
that is the same as resizing the RGB pixels bicubic, take the C++ resize (bit for bit Pillow's, no GIL).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..errors import InputError

# Decompression-bomb guard: checked against the header before any pixel is decoded.
DEFAULT_MAX_PIXELS = 64_000_000

# VLM2Vec's "high" resolution: images are resized to this square before the backbone's processor.
HIGH_RESOLUTION = 1344


def describe(image: Any) -> str:
    """A short name for an image source, for error messages."""
    if isinstance(image, (str, os.PathLike)):
        return f"image file {os.fspath(image)!r}"
    if isinstance(image, (bytes, bytearray)):
        return f"image bytes ({len(image)} bytes)"
    if isinstance(image, np.ndarray):
        return f"image array {image.shape} {image.dtype}"
    if isinstance(image, Image.Image):
        return f"PIL image {image.size} mode {image.mode}"
    return f"image of type {type(image).__name__}"


Size = tuple[int, int] | Callable[[int, int], tuple[int, int] | None] | None


class StoredImage(os.PathLike):
    """An image file to decode as stored: its EXIF orientation is not applied (a plain `Image.open`).

    MMEB evaluation reads its images this way, as the official VLM2Vec code does; anything else given by
    path is turned upright first. Usable wherever a path is (`os.fspath`, `Item(image=...)`).
    """

    __slots__ = ("path",)

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"StoredImage({self.path!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoredImage) and other.path == self.path

    def __hash__(self) -> int:
        return hash((StoredImage, self.path))


def load_image(image: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, size: Size = None) -> np.ndarray:
    """Decode and validate one image; returns a C-contiguous uint8 array of shape (H, W, 3).

    size=(width, height), or a function of the decoded (width, height) giving one or None: resize to it as
    `PIL.Image.resize(size)` does on the decoded image in its own mode, then convert (see the module's
    docstring). max_pixels limits the source image. A path, bytes or PIL image is turned upright by its EXIF
    orientation before anything else (size gets the upright width and height); a `StoredImage` is not.
    """
    if isinstance(image, np.ndarray):
        return _resized(_from_array(image, max_pixels=max_pixels), size, max_pixels)
    what = describe(image)
    if isinstance(image, Image.Image):
        _check_size(image.size, what, max_pixels)
        return _pil_to_rgb_resized(exif_upright(image, what), what, size, max_pixels)
    if isinstance(image, (str, os.PathLike)):
        try:
            path = os.fspath(image)
        except TypeError as e:  # a PathLike whose __fspath__ gives neither str nor bytes
            raise InputError(f"{what}: not a usable path ({e})") from None
        if not os.path.isfile(path):
            raise InputError(f"image file {path!r} does not exist")
        try:
            with open(path, "rb") as f:
                decoded = _decode(f, what, max_pixels)  # its own errors are InputErrors already
        except OSError as e:  # the open itself: permissions, a special file
            raise InputError(f"{what} cannot be opened: {e.strerror or e}") from None
        if not isinstance(image, StoredImage):
            decoded = exif_upright(decoded, what)
        return _pil_to_rgb_resized(decoded, what, size, max_pixels)
    if isinstance(image, (bytes, bytearray)):
        if not image:
            raise InputError("image bytes are empty")
        decoded = _decode(io.BytesIO(bytes(image)), what, max_pixels)
        return _pil_to_rgb_resized(exif_upright(decoded, what), what, size, max_pixels)
    raise InputError(
        f"unsupported {describe(image)}: expected a path, bytes, a PIL.Image or a uint8 HxWx3 array"
    )


def exif_upright(img: Image.Image, what: str = "image") -> Image.Image:
    """`img` turned as its EXIF orientation tag says (`PIL.ImageOps.exif_transpose`); the image itself
    when it has no orientation to apply (no copy). An unreadable EXIF block counts as no orientation:
    Pillow decodes the pixels without it."""
    try:
        orientation = img.getexif().get(0x0112, 1)  # 0x0112: Orientation
    except Exception:  # malformed EXIF raises many kinds of error; the pixels are still fine without it
        return img
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, ValueError) as e:
        raise InputError(f"{what}: cannot apply its EXIF orientation {orientation}: {e}") from None


def _resized(pixels: np.ndarray, size: Size, max_pixels: int) -> np.ndarray:
    if callable(size):
        size = size(pixels.shape[1], pixels.shape[0])
    if size is None:
        return pixels
    return resize_square(pixels, size[0], max_pixels=max_pixels, height=size[1])


def _pil_to_rgb_resized(img: Image.Image, what: str, size: Size, max_pixels: int) -> np.ndarray:
    if callable(size):
        size = size(*img.size)
    # RGB and plain grey: converting to RGB commutes with a bicubic resize, bit for bit, so the C++ one serves
    plain = img.mode == "RGB" or (img.mode == "L" and "transparency" not in img.info)
    if size is None or plain or tuple(img.size) == tuple(size):
        return _resized(_pil_to_rgb(img, what), size, max_pixels)
    try:
        img = img.resize(tuple(size))  # Pillow's default filter for the mode, as the official code calls it
    except (OSError, ValueError) as e:
        raise InputError(f"{what}: cannot resize mode {img.mode} to {size[0]}x{size[1]}: {e}") from None
    return _pil_to_rgb(img, what)


def resize_square(
    image: np.ndarray,
    side: int = HIGH_RESOLUTION,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    height: int | None = None,
) -> np.ndarray:
    """Resize a uint8 RGB array to side x side (or side wide, `height` high), Pillow's bicubic bit for bit.

    Runs in the C++ tiling core, without the GIL. max_pixels is the caller's limit on the input image.
    """
    from . import tiling

    height = side if height is None else height
    if image.shape[0] == height and image.shape[1] == side:
        return image
    return tiling.resize(image, height, side, max_image_pixels=max(max_pixels, side * height))


def _check_size(size: tuple[int, int], what: str, max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise InputError(f"{what} has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise InputError(
            f"{what} has {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
            "(a decompression bomb guard; raise max_image_pixels=, or --max-image-pixels, to allow it)"
        )


def _decode(f: io.IOBase, what: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # We apply our own pixel limit from the header; Pillow's warning would be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(f)
            _check_size(img.size, what, max_pixels)
            img.load()
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{what} is over the pixel limit (a decompression bomb guard): {e}") from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as e:
        raise InputError(f"{what} is not a readable image (corrupt or truncated): {e}") from None
    return img


def _pil_to_rgb(img: Image.Image, what: str) -> np.ndarray:
    mode = img.mode
    try:
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            arr = np.asarray(img).astype(np.float64)
            # 16-bit data is stored in "I;16*" and often in "I" (PNG); 32-bit "I" beyond 65535 is rescaled.
            top = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
            grey = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
            return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
        if mode == "F":
            return _from_array(np.asarray(img), max_pixels=None)
        if mode == "RGB":  # as transformers' convert_to_rgb: an RGB image's tRNS colour key is not applied
            return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
        has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
        if has_alpha:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        rgb = img.convert("RGB")
        return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    except (OSError, ValueError) as e:
        raise InputError(f"{what}: cannot convert mode {mode} to RGB: {e}") from None


def _from_array(arr: np.ndarray, *, max_pixels: int | None) -> np.ndarray:
    what = describe(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise InputError(f"{what}: expected shape (H, W, 3) (or (H, W), (H, W, 1), (H, W, 4))")
    h, w = arr.shape[:2]
    if max_pixels is not None:
        _check_size((w, h), what, max_pixels)
    elif h == 0 or w == 0:
        raise InputError(f"{what} has zero size")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InputError(f"{what} contains NaN or infinity")
        scale = 255.0 if arr.size and float(arr.max()) <= 1.0 else 1.0
        arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    elif arr.dtype == np.uint16:
        arr = np.rint(arr.astype(np.float64) / 65535.0 * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise InputError(f"{what}: expected dtype uint8 (or uint16 / float), got {arr.dtype}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        arr = np.rint(arr[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(arr)
