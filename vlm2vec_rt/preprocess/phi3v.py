"""Phi-3.5-V image preprocessing in plain Python: the reference the C++ `tiling.phi3v` is tested against.

It follows, step by step, the official `Phi3VImageProcessor` (`image_processing_phi3_v.py`, shipped with
microsoft/Phi-3.5-vision-instruct and vendored by VLM2Vec), with the library calls that code makes spelled
out as what they do on a PIL image:

- `HD_transform(img, hd_num=num_crops)`: transpose a tall image (`Image.TRANSPOSE`) so width >= height;
  ratio = width / height; scale = the largest s with `s * ceil(s / ratio) <= hd_num`; resize to
  (s * 336) x int(s * 336 / ratio) with `torchvision.transforms.functional.resize`, which on a PIL image
  is `Image.resize(size, BILINEAR)` (torchvision's default interpolation); `padding_336`: white rows
  (fill 255) above and below to the next multiple of 336, top = int(padding / 2); transpose back.
- `ToTensor()` + `Normalize(mean, std)`: float32 x / 255, then (x - mean) / std in float32.
- global view: `torch.nn.functional.interpolate(hd[None], size=(336, 336), mode="bicubic")` on the
  normalised HD image (align_corners False, no antialiasing).
- crops: `reshape(1, 3, h // 336, 336, w // 336, 336).permute(0, 2, 4, 1, 3, 5)`, i.e. 336x336 crops
  row-major, after the global view; `pad_to_max_num_crops_tensor` appends zero views up to num_crops + 1.
- `image_sizes`: (h, w) of the HD image; `num_img_tokens`:
  `((h // 336) * (w // 336) + 1) * 144 + 1 + (h // 336 + 1) * 12`; `calc_num_image_tokens_from_image_size`
  gets the same from the original size through `calc_hd_transform_size` (here `phi3v_num_tokens`).

The official processor fails when the resize would give a side of 0 pixels (an aspect ratio over
num_crops * 336); here that is an `InputError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from .tiling import CLIP_MEAN, CLIP_STD

CROP = 336
TOKENS_PER_VIEW = 144  # 24 x 24 CLIP patches per 336 view, merged 2 x 2 by the projector
TOKENS_PER_ROW = 12  # a newline token after each of the 12 feature rows of a row of crops


def _hd_geometry(height: int, width: int, num_crops: int) -> tuple[bool, int, int, int, int]:
    """(transposed, new_w, new_h, pad_top, padded_h) of HD_transform, in its transposed frame (width >= height).

    `HD_transform` / `calc_hd_transform_size` + `calc_padded_size`, with the same float operations.
    """
    if isinstance(num_crops, bool) or not isinstance(num_crops, int) or num_crops < 1:
        raise InputError(f"num_crops must be a positive integer, got {num_crops!r}")
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * CROP)
    new_h = int(new_w / ratio)
    if new_h < 1:
        raise InputError(
            f"aspect ratio {ratio:.1f} is too extreme for num_crops={num_crops}: the HD transform would resize "
            "the short side to 0 pixels (the official processor fails too)"
        )
    padded_h = int(math.ceil(new_h / CROP) * CROP)
    return transposed, new_w, new_h, int((padded_h - new_h) / 2), padded_h


def phi3v_image_size(height: int, width: int, num_crops: int = 16) -> tuple[int, int]:
    """(height, width) of the HD image (`image_sizes`) for an image of height x width: multiples of 336."""
    transposed, new_w, _, _, padded_h = _hd_geometry(height, width, num_crops)
    return (new_w, padded_h) if transposed else (padded_h, new_w)


def phi3v_num_tokens(height: int, width: int, num_crops: int = 16) -> int:
    """`num_img_tokens` of an image of height x width, from its size alone (as
    `calc_num_image_tokens_from_image_size`): 144 per crop and for the global view, 1 separator between
    them, and 12 newline tokens per row of crops and 12 for the global view."""
    h, w = phi3v_image_size(height, width, num_crops)
    return ((h // CROP) * (w // CROP) + 1) * TOKENS_PER_VIEW + 1 + (h // CROP + 1) * TOKENS_PER_ROW


def phi3v_reference(
    image: np.ndarray,
    *,
    num_crops: int = 16,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> tuple[np.ndarray, tuple[int, int], int]:
    """Phi3VImageProcessor on one uint8 HxWx3 RGB image, computed as the official code computes it.

    Returns (pixel_values float32 [num_crops + 1, 3, 336, 336], image_size (h, w) of the HD image,
    num_img_tokens).
    """
    import torch
    from PIL import Image, ImageOps

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise InputError(f"expected a non-empty uint8 HxWx3 array, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    transposed, new_w, new_h, top, padded_h = _hd_geometry(height, width, num_crops)

    # HD_transform
    img = Image.fromarray(np.ascontiguousarray(image), "RGB")
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    if img.size != (new_w, new_h):  # torchvision's resize returns the image itself at the same size
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    # padding_336: torchvision's pad on a PIL image is ImageOps.expand (left, top, right, bottom)
    img = ImageOps.expand(img, border=(0, top, 0, padded_h - new_h - top), fill=(255, 255, 255))
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)

    # ToTensor + Normalize, in float32 as torch computes them (in place: the same operations, fewer copies)
    hd = np.asarray(img).transpose(2, 0, 1).astype(np.float32)
    hd /= np.float32(255)
    hd -= np.asarray(mean, dtype=np.float32)[:, None, None]
    hd /= np.asarray(std, dtype=np.float32)[:, None, None]
    h, w = hd.shape[1:]

    # global view: bicubic interpolate of the normalised image
    global_view = torch.nn.functional.interpolate(
        torch.from_numpy(hd)[None], size=(CROP, CROP), mode="bicubic"
    ).numpy()

    # crops, row-major, after the global view; zero views up to num_crops + 1
    rows, cols = h // CROP, w // CROP
    pixel_values = np.zeros((num_crops + 1, 3, CROP, CROP), np.float32)
    pixel_values[0] = global_view[0]
    crops = pixel_values[1 : 1 + rows * cols].reshape(rows, cols, 3, CROP, CROP)
    crops[...] = hd.reshape(3, rows, CROP, cols, CROP).transpose(1, 3, 0, 2, 4)
    tokens = (rows * cols + 1) * TOKENS_PER_VIEW + 1 + (rows + 1) * TOKENS_PER_ROW
    return pixel_values, (h, w), tokens


__all__ = ["phi3v_image_size", "phi3v_num_tokens", "phi3v_reference"]
