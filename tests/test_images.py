"""Image loading: every source type, every conversion, every way an image can be bad."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vlm2vec_rt import InputError
from vlm2vec_rt.preprocess.images import load_image, resize_square


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_sources_agree(tmp_path, photos):
    arr = photos["chelsea"]
    path = tmp_path / "cat.png"
    Image.fromarray(arr).save(path)
    for source in (arr, Image.fromarray(arr), path, str(path), path.read_bytes()):
        out = load_image(source)
        assert out.dtype == np.uint8 and out.shape == arr.shape and out.flags.c_contiguous
        np.testing.assert_array_equal(out, arr)


def test_non_contiguous_array_is_accepted(photos):
    arr = photos["astronaut"][::3, ::2]
    np.testing.assert_array_equal(load_image(arr), arr)


def test_conversions():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red pixel, the rest fully transparent -> white
    out = load_image(Image.fromarray(rgba, "RGBA"))
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)
    np.testing.assert_array_equal(load_image(rgba), out)

    palette = Image.fromarray(np.arange(6, dtype=np.uint8).reshape(2, 3)).convert("P")
    assert load_image(palette).shape == (2, 3, 3)

    cmyk = Image.new("CMYK", (5, 4), (0, 255, 255, 0))  # red in CMYK
    assert tuple(load_image(cmyk)[0, 0]) == (255, 0, 0)

    grey16 = Image.fromarray(np.array([[0, 65535], [32768, 257]], dtype=np.uint16))
    out16 = load_image(grey16)
    assert out16.shape == (2, 2, 3) and out16[0, 1, 0] == 255 and out16[1, 1, 0] == 1 and out16[0, 0, 0] == 0
    np.testing.assert_array_equal(load_image(np.array([[0, 65535]], dtype=np.uint16))[0, :, 0], [0, 255])

    assert load_image(np.full((3, 3), 7, np.uint8)).shape == (3, 3, 3)
    assert load_image(Image.new("1", (3, 3), 1))[0, 0, 0] == 255
    np.testing.assert_array_equal(load_image(np.ones((2, 2, 3), np.float32))[0, 0], [255, 255, 255])


def test_corrupt_and_truncated_files(tmp_path, photos):
    good = _png_bytes(Image.fromarray(photos["coffee"]))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00\x01nope" * 100)
    for path in (truncated, garbage):
        with pytest.raises(InputError, match="not a readable image") as e:
            load_image(path)
        assert str(path) in str(e.value)
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="empty"):
        load_image(b"")


def _png_with_header_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims another size: decoders must not trust it blindly."""
    data = bytearray(_png_bytes(Image.new("RGB", (1, 1))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_decompression_bomb_is_refused_from_the_header():
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(_png_with_header_size(20000, 20000))  # 400 MP claimed: Pillow's own guard
    with pytest.raises(InputError, match="over the limit"):
        load_image(_png_with_header_size(9000, 8000))  # 72 MP: over our 64 MP default
    with pytest.raises(InputError, match="over the limit"):
        load_image(np.zeros((40, 40, 3), np.uint8), max_pixels=1000)


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros((0, 5, 3), np.uint8), "zero size"),
        (np.zeros((5, 5, 2), np.uint8), "expected shape"),
        (np.zeros((2, 5, 5, 3), np.uint8), "expected shape"),
        (np.zeros((5, 5, 3), np.int64), "expected dtype"),
        (np.full((2, 2, 3), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_arrays(arr, match):
    with pytest.raises(InputError, match=match):
        load_image(arr)


def test_zero_size_pil_image():
    with pytest.raises(InputError, match="zero size"):
        load_image(Image.new("RGB", (0, 4)))


def test_resize_square_is_pillow_bicubic(photos):
    arr = photos["flower"]
    ref = np.asarray(Image.fromarray(arr).resize((1344, 1344), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(resize_square(arr), ref)
