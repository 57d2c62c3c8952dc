"""Phi-3.5-V preprocessing: the C++ `tiling.phi3v` against the plain-Python reference `preprocess.phi3v`, and
the reference against facts worked out by hand from the official Phi3VImageProcessor.

Tolerance: after undoing the normalisation every pixel within 1/255. The crops are in fact bit-equal (the
bilinear resize is Pillow's bit for bit and the normalisation a table of the reference's float32 values),
and that is asserted too; the global view matches torch's bicubic interpolate to float rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlm2vec_rt import _C, InputError, tiling
from vlm2vec_rt.preprocess import tiling as tiling_impl
from vlm2vec_rt.preprocess.phi3v import phi3v_image_size, phi3v_num_tokens, phi3v_reference

ISAS = ["scalar", "avx2", "avx512"][: ["scalar", "avx2", "avx512"].index(_C.best_isa()) + 1]
STD = np.asarray(tiling.CLIP_STD, np.float64).reshape(1, 3, 1, 1)


@pytest.fixture(params=ISAS)
def isa(request):
    """Run a test with the scalar kernels and with each SIMD instruction set the CPU has."""
    assert _C.set_isa(request.param) == request.param
    yield request.param
    _C.set_isa("auto")


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def assert_same(got, ref) -> None:
    """Same views, HD size and token count; every pixel within 1/255; crops bit-equal."""
    pv, size, tokens = got
    ref_pv, ref_size, ref_tokens = ref
    assert (size, tokens) == (ref_size, ref_tokens)
    assert pv.dtype == np.float32 and pv.shape == ref_pv.shape
    err = np.abs(pv.astype(np.float64) - ref_pv) * STD * 255.0
    assert err.max() <= 1.0 + 1e-6, f"max pixel error {err.max():.4f}/255"
    # the global view: torch's sums in another order, so float rounding only
    np.testing.assert_allclose(pv[0], ref_pv[0], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(pv[1:], ref_pv[1:])


# (height, width): square, wide and tall, odd, sides under and over 336, padding above/below and left/right
SHAPES = [(1, 1), (20, 20), (13, 200), (200, 13), (337, 335), (335, 337), (450, 1200), (1344, 1344)]


@pytest.mark.parametrize("num_crops", [4, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_reference(shape, num_crops, rng):
    image = random_image(rng, *shape)
    assert_same(tiling.phi3v(image, num_crops=num_crops), phi3v_reference(image, num_crops=num_crops))


def test_grey_converted_matches_reference(rng):
    grey = np.asarray(Image.fromarray(random_image(rng, 301, 517)).convert("L").convert("RGB"))
    for num_crops in (4, 16):
        assert_same(tiling.phi3v(grey, num_crops=num_crops), phi3v_reference(grey, num_crops=num_crops))


@pytest.mark.parametrize("shape", [(97, 61), (600, 800), (1000, 1344)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_instruction_set_gives_the_same_bits(shape, rng, isa):
    image = random_image(rng, *shape)
    got = tiling.phi3v(image, num_crops=16)
    _C.set_isa("scalar")
    ref = tiling.phi3v(image, num_crops=16)
    np.testing.assert_array_equal(got[0], ref[0])


@pytest.mark.parametrize("shape", [(1500, 40), (40, 1500)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_long_hd_side_matches_reference(shape, rng, isa):
    # An HD side of 37 crops: the global view's taps skip most canvas rows (tall) or columns (wide), which the
    # crops still need; the output is large enough to be written with non-temporal stores.
    image = random_image(rng, *shape)
    assert_same(tiling.phi3v(image, num_crops=64), phi3v_reference(image, num_crops=64))


def test_strided_input_and_batch_match_single_calls(rng):
    base = random_image(rng, 400, 900)
    images = [base[::2, ::-1], base[:, 100:250], random_image(rng, 336, 336), random_image(rng, 5, 800)]
    singles = [tiling.phi3v(im, num_crops=4) for im in images]
    assert_same(singles[0], phi3v_reference(images[0], num_crops=4))
    for threads in (1, 2):
        batch = tiling.phi3v_batch(images, num_crops=4, num_threads=threads)
        for (pv, size, tokens), (ref_pv, ref_size, ref_tokens) in zip(batch, singles):
            assert (size, tokens) == (ref_size, ref_tokens)
            np.testing.assert_array_equal(pv, ref_pv)


def test_token_counts_from_the_official_formula():
    # Worked by hand from HD_transform and num_img_tokens = ((h//336)*(w//336)+1)*144 + 1 + (h//336+1)*12.
    # Any square: num_crops 16 -> scale 4 (4 * ceil(4/1) = 16), a 1344x1344 HD image, 4x4 crops.
    # num_crops 4 -> scale 2, 672x672, 2x2 crops.
    for side in (336, 1344):
        assert phi3v_num_tokens(side, side, 16) == (16 + 1) * 144 + 1 + (4 + 1) * 12 == 2509
        assert phi3v_num_tokens(side, side, 4) == (4 + 1) * 144 + 1 + (2 + 1) * 12 == 757
        assert phi3v_image_size(side, side, 16) == (1344, 1344)
        assert phi3v_image_size(side, side, 4) == (672, 672)
    # 800 wide, 600 high, num_crops 16: ratio 4/3, scale 4 (4 * 3 = 12; 5 * 4 = 20 > 16) -> 1344 x 1008
    assert phi3v_image_size(600, 800, 16) == (1008, 1344)
    assert phi3v_num_tokens(600, 800, 16) == (12 + 1) * 144 + 1 + (3 + 1) * 12 == 1921
    # tall: the same image transposed gives the transposed HD size, and 12 newlines per crop row
    assert phi3v_image_size(800, 600, 16) == (1344, 1008)
    assert phi3v_num_tokens(800, 600, 16) == 13 * 144 + 1 + 5 * 12 == 1933
    # the reference's pixel path agrees with its size-only arithmetic
    image = np.zeros((336, 336, 3), np.uint8)
    for num_crops, tokens, size in ((4, 757, (672, 672)), (16, 2509, (1344, 1344))):
        pv, got_size, got_tokens = phi3v_reference(image, num_crops=num_crops)
        assert (got_size, got_tokens, pv.shape) == (size, tokens, (num_crops + 1, 3, 336, 336))


def test_plan_matches_reference_arithmetic(rng):
    sizes = [(1, 1), (1, 1344), (1344, 1), (336, 335), (999, 1000), (1000, 1344), (5376, 1)]
    sizes += [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(300)]
    for h, w in sizes:
        for num_crops in (1, 4, 16, 64):
            try:
                size, tokens = phi3v_image_size(h, w, num_crops), phi3v_num_tokens(h, w, num_crops)
            except InputError:
                with pytest.raises(InputError, match="aspect ratio"):
                    tiling.phi3v_plan(h, w, num_crops=num_crops)
                continue
            plan = tiling.phi3v_plan(h, w, num_crops=num_crops)
            assert (plan["image_size"], plan["num_img_tokens"]) == (size, tokens), (h, w, num_crops)
            rows, cols = plan["grid"]
            assert rows * 336 == size[0] and cols * 336 == size[1] and rows * cols <= num_crops


def test_layout_white_padding_zero_views_and_global_view(rng):
    # 800 wide, 300 high, num_crops 16: scale 5 (5 * 2 = 10; 6 * 3 = 18 > 16) -> 1680 x 630, padded to 672
    # (21 white rows above, 21 below): 2 x 5 crops + the global view, then 6 zero views.
    image = random_image(rng, 300, 800)
    plan = tiling.phi3v_plan(300, 800, num_crops=16)
    assert plan == {
        "transposed": False,
        "resized": (630, 1680),
        "pad": (21, 0),
        "image_size": (672, 1680),
        "grid": (2, 5),
        "num_img_tokens": 11 * 144 + 1 + 3 * 12,
    }
    pv, size, _ = tiling.phi3v(image, num_crops=16)
    white = (1.0 - np.asarray(tiling.CLIP_MEAN, np.float32)) / np.asarray(tiling.CLIP_STD, np.float32)
    for view in (1, 5):  # first row of crops: padding on top
        np.testing.assert_array_equal(pv[view][:, :21], np.broadcast_to(white[:, None, None], (3, 21, 336)))
    for view in (6, 10):  # second row: padding at the bottom
        np.testing.assert_array_equal(pv[view][:, -21:], np.broadcast_to(white[:, None, None], (3, 21, 336)))
    assert not pv[11:].any()
    # tall images pad left and right
    assert tiling.phi3v_plan(800, 300, num_crops=16)["pad"] == (0, 21)
    # a white image: every used view is white (bicubic weights sum to 1 up to rounding)
    pv, _, _ = tiling.phi3v(np.full((700, 500, 3), 255, np.uint8), num_crops=4)
    used = 1 + np.prod(tiling.phi3v_plan(700, 500, num_crops=4)["grid"])
    np.testing.assert_allclose(
        pv[:used], np.broadcast_to(white[None, :, None, None], pv[:used].shape), atol=1e-5
    )


def test_custom_mean_std_and_table(rng):
    mean, std = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)
    image = random_image(rng, 50, 70)
    pv, _, _ = tiling.phi3v(image, num_crops=4, mean=mean, std=std)
    ref, _, _ = phi3v_reference(image, num_crops=4, mean=mean, std=std)
    np.testing.assert_array_equal(pv[1:], ref[1:])
    np.testing.assert_allclose(pv[0], ref[0], atol=1e-5)
    # the table: torchvision's ToTensor (float32 x / 255) then Normalize, in float32
    x = np.arange(256, dtype=np.float32) / np.float32(255)
    m = np.asarray(mean, np.float32)[:, None]
    s = np.asarray(std, np.float32)[:, None]
    np.testing.assert_array_equal(tiling_impl._phi3v_args(4, mean, std), (x[None] - m) / s)


@pytest.mark.parametrize(
    "image, kwargs, match",
    [
        (np.zeros((10, 10, 3), np.float32), {}, "uint8"),
        (np.zeros((10, 10), np.uint8), {}, "shape"),
        (np.zeros((0, 10, 3), np.uint8), {}, "empty"),
        ([[0]], {}, "numpy"),
        (np.zeros((10, 10, 3), np.uint8), {"num_crops": 0}, "num_crops"),
        (np.zeros((10, 10, 3), np.uint8), {"num_crops": 65}, "num_crops"),
        (np.zeros((10, 10, 3), np.uint8), {"num_crops": True}, "num_crops"),
        (np.zeros((10, 10, 3), np.uint8), {"num_crops": 4.0}, "num_crops"),
        (np.zeros((10, 10, 3), np.uint8), {"std": (1, 0, 1)}, "std"),
        (np.zeros((10, 10, 3), np.uint8), {"mean": (1, 2)}, "mean"),
        (np.zeros((100, 100, 3), np.uint8), {"max_image_pixels": 9999}, "limit"),
        (np.zeros((1, 1345, 3), np.uint8), {"num_crops": 4}, "aspect ratio"),  # side resized to 0 px
    ],
)
def test_bad_input_is_an_input_error(image, kwargs, match):
    with pytest.raises(InputError, match=match):
        tiling.phi3v(image, **kwargs)


def test_batch_errors_name_the_image():
    good = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(InputError, match="image 1"):
        tiling.phi3v_batch([good, np.zeros((10, 10), np.uint8)])
    with pytest.raises(InputError, match=r"image 1 \(3000x1\): aspect ratio"):
        tiling.phi3v_batch([good, np.zeros((1, 3000, 3), np.uint8)], num_crops=4)
    with pytest.raises(InputError, match="num_threads"):
        tiling.phi3v_batch([good], num_threads=-1)
    with pytest.raises(InputError, match="list"):
        tiling.phi3v_batch(good)
    assert tiling.phi3v_batch([]) == []
    with pytest.raises(InputError, match="aspect ratio"):
        phi3v_reference(np.zeros((1, 1345, 3), np.uint8), num_crops=4)
