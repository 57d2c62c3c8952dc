"""C++ tiling (vlm2vec_rt.tiling) against its references: Pillow's resize, transformers' LLaVA-NeXT and
Qwen2-VL Pillow processors, and the scalar kernels against the SIMD ones.

The issue's tolerance (after undoing the normalisation every pixel within 1/255, mean under 0.1/255) is
checked everywhere; float32 is in fact bit-equal to transformers and that is asserted too, so a change in
Pillow's rounding shows up here first.
"""

from __future__ import annotations

import functools
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm2vec_rt import _C, InputError, tiling
from vlm2vec_rt.preprocess.images import resize_square

HIGH = [list(p) for p in tiling.HIGH_RESOLUTION_PINPOINTS]
LLAVA_DEFAULT = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6 checkpoints
# Every instruction set this CPU has, the scalar reference first.
ISAS = ["scalar", "avx2", "avx512"][: ["scalar", "avx2", "avx512"].index(_C.best_isa()) + 1]


@functools.cache
def llava_processor(pinpoints: tuple, crop: int = 336):
    from transformers import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        image_grid_pinpoints=[list(p) for p in pinpoints],
    )


@functools.cache
def qwen_processor(min_pixels: int, max_pixels: int, patch_size: int = 14):
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size)


def llava_reference(image: np.ndarray, pinpoints, crop: int = 336) -> np.ndarray:
    proc = llava_processor(tuple(tuple(p) for p in pinpoints), crop)
    return proc(image, return_tensors="np", input_data_format="channels_last")["pixel_values"][0]


def qwen_reference(image: np.ndarray, min_pixels: int, max_pixels: int, patch_size: int = 14):
    out = qwen_processor(min_pixels, max_pixels, patch_size)(
        image, return_tensors="np", input_data_format="channels_last"
    )
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


def assert_matches(got: np.ndarray, ref: np.ndarray, channel_axis: int, *, exact: bool = True) -> None:
    """The issue's tolerance in pixel units (normalisation undone), then (float32) bit equality."""
    assert got.shape == ref.shape
    shape = [1] * ref.ndim
    shape[channel_axis] = 3
    mean = np.asarray(tiling.CLIP_MEAN).reshape(shape)
    std = np.asarray(tiling.CLIP_STD).reshape(shape)
    if ref.shape[channel_axis] != 3:  # Qwen2-VL rows: [3 * T * P * P], channel-major
        got = got.reshape(got.shape[0], 3, -1)
        ref = ref.reshape(ref.shape[0], 3, -1)
        mean, std = mean.reshape(1, 3, 1), std.reshape(1, 3, 1)
    diff = np.abs((got.astype(np.float64) - ref.astype(np.float64)) * std) * 255.0
    assert diff.max() <= 1.0 + 1e-3, f"max pixel error {diff.max():.4f}/255"
    assert diff.mean() < 0.1, f"mean pixel error {diff.mean():.4f}/255"
    if exact:
        np.testing.assert_array_equal(got, ref)


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(params=ISAS)
def isa(request):
    """Run a test with the scalar reference kernels and with each SIMD instruction set the CPU has."""
    assert _C.set_isa(request.param) == request.param
    yield request.param
    _C.set_isa("auto")


# ---- resampler ----------------------------------------------------------------------------------------
RESIZE_CASES = [
    ((1, 1), (336, 336)),
    ((1, 3000), (1, 1008)),
    ((3000, 1), (1008, 1)),
    ((1344, 1344), (336, 336)),  # VLM2Vec high: 4x antialiased downscale
    ((600, 800), (1344, 1344)),  # "high" upscale
    ((100, 100), (60, 150)),  # height shrinks, width grows: Pillow runs the vertical pass first
    ((116, 47), (62, 46)),  # both shrink, height more than twice as much: vertical first
    ((157, 121), (140, 111)),  # both shrink about equally: horizontal first
    ((37, 5), (3, 77)),
    ((513, 7), (2, 2)),
    ((2, 2), (513, 7)),
    ((335, 337), (337, 335)),
]


@pytest.mark.parametrize("src,dst", RESIZE_CASES)
def test_resize_is_pillow_bicubic(src, dst, rng, isa):
    image = random_image(rng, *src)
    ref = np.asarray(Image.fromarray(image).resize(dst[::-1], Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(tiling.resize(image, *dst), ref)


def test_resize_random_sizes(rng, isa):
    for _ in range(40):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 160, 4))
        image = random_image(rng, h, w)
        ref = np.asarray(Image.fromarray(image).resize((ow, oh), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(tiling.resize(image, oh, ow), ref, err_msg=f"{(h, w)} -> {(oh, ow)}")


def test_resize_square_matches_images_module(photos):
    image = photos["chelsea"]
    np.testing.assert_array_equal(tiling.resize(image, 1344, 1344), resize_square(image, 1344))


# ---- LLaVA-NeXT anyres --------------------------------------------------------------------------------
def test_anyres_photos_match_transformers(photos):
    for name, image in photos.items():
        pinpoints = HIGH if len(name) % 2 else LLAVA_DEFAULT  # both grids over the set, half the time
        got = tiling.anyres(image, grid_pinpoints=pinpoints)
        assert_matches(got, llava_reference(image, pinpoints), channel_axis=1)


ANYRES_SHAPES = [
    (1, 1),
    (1, 3000),
    (3000, 1),
    (2, 3),
    (7, 5),
    (335, 337),
    (336, 336),
    (336, 672),
    (672, 1008),
    (1008, 336),
    (1344, 1344),
    (1345, 1343),
    (1500, 2000),
    (97, 1999),
]


@pytest.mark.parametrize("shape", ANYRES_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_anyres_random_images_match_transformers(shape, rng, isa):
    image = random_image(rng, *shape)
    for pinpoints in (HIGH, LLAVA_DEFAULT):
        assert_matches(tiling.anyres(image, grid_pinpoints=pinpoints), llava_reference(image, pinpoints), 1)


def test_anyres_small_crop_matches_transformers(rng):
    pinpoints = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84], [112, 84]]
    for shape in [(1, 1), (5, 200), (60, 61), (113, 85), (300, 20)]:
        image = random_image(rng, *shape)
        got = tiling.anyres(image, grid_pinpoints=pinpoints, crop_size=28)
        assert_matches(got, llava_reference(image, pinpoints, 28), channel_axis=1)


def test_anyres_view_count_and_order(rng):
    image = random_image(rng, 1344, 1344)
    views = tiling.anyres(image, grid_pinpoints=HIGH)
    assert views.shape == (17, 3, 336, 336)  # VLM2Vec high: base view + 4x4 tiles
    # Tiles are row-major cuts of the (here unresized) image; view 0 is the squashed whole image.
    plain = tiling.anyres(image[336:672, 672:1008].copy(), grid_pinpoints=[[336, 336]])
    np.testing.assert_array_equal(views[1 + 1 * 4 + 2], plain[1])
    np.testing.assert_array_equal(
        views[0], tiling.anyres(tiling.resize(image, 336, 336), grid_pinpoints=HIGH)[0]
    )


def test_anyres_float16_is_float32_rounded(photos, rng):
    for image in (photos["astronaut"], random_image(rng, 601, 403)):
        ref = tiling.anyres(image, grid_pinpoints=HIGH)
        half = tiling.anyres(image, grid_pinpoints=HIGH, dtype="float16")
        assert half.dtype == np.float16
        np.testing.assert_array_equal(half, ref.astype(np.float16))
        assert_matches(half.astype(np.float32), ref, 1, exact=False)


def test_anyres_custom_mean_std_rescale(rng):
    image = random_image(rng, 50, 70)
    mean, std = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)
    got = tiling.anyres(
        image, grid_pinpoints=[[56, 56]], crop_size=28, mean=mean, std=std, rescale_factor=1 / 127
    )
    proc = llava_processor(((56, 56),), 28)
    ref = proc(
        image,
        image_mean=list(mean),
        image_std=list(std),
        rescale_factor=1 / 127,
        return_tensors="np",
        input_data_format="channels_last",
    )["pixel_values"][0]
    np.testing.assert_array_equal(got, ref)


def test_high_resolution_resize_to(photos, rng):
    for image in (photos["coffee"], random_image(rng, 333, 1021)):
        got = tiling.anyres(image, grid_pinpoints=HIGH, resize_to=1344)
        assert got.shape == (17, 3, 336, 336)
        squared = resize_square(image, 1344)
        np.testing.assert_array_equal(got, tiling.anyres(squared, grid_pinpoints=HIGH))
        (batched,) = tiling.anyres_batch([image], grid_pinpoints=HIGH, resize_to=1344)
        np.testing.assert_array_equal(batched, got)
        assert_matches(got, llava_reference(squared, HIGH), channel_axis=1)


NONCONTIGUOUS = {
    "step": lambda a: a[::2, ::3],
    "flipped": lambda a: a[::-1, ::-1],
    "bgr_view": lambda a: a[..., ::-1],
    "transposed": lambda a: a.transpose(1, 0, 2),
    "crop": lambda a: a[5:-7, 3:-2],
    "broadcast": lambda a: np.broadcast_to(a[:1], a.shape),
}


@pytest.mark.parametrize("view", NONCONTIGUOUS)
def test_noncontiguous_inputs(view, rng, isa):
    image = NONCONTIGUOUS[view](random_image(rng, 211, 157))
    dense = np.ascontiguousarray(image)
    np.testing.assert_array_equal(
        tiling.anyres(image, grid_pinpoints=HIGH), tiling.anyres(dense, grid_pinpoints=HIGH)
    )
    np.testing.assert_array_equal(tiling.resize(image, 97, 300), tiling.resize(dense, 97, 300))
    q, grid = tiling.qwen2vl(image, min_pixels=3136, max_pixels=50176)
    q_dense, grid_dense = tiling.qwen2vl(dense, min_pixels=3136, max_pixels=50176)
    assert grid == grid_dense
    np.testing.assert_array_equal(q, q_dense)


def test_batch_matches_single_calls(photos, rng):
    images = [
        photos["rocket"],
        random_image(rng, 1, 1),
        random_image(rng, 800, 600)[::2],
        random_image(rng, 90, 3),
    ]
    singles = [tiling.anyres(im, grid_pinpoints=HIGH, dtype="float16") for im in images]
    for threads in (0, 1, 2, 5):
        batch = tiling.anyres_batch(images, grid_pinpoints=HIGH, dtype="float16", num_threads=threads)
        assert len(batch) == len(images)
        for a, b in zip(batch, singles):
            np.testing.assert_array_equal(a, b)
    assert tiling.anyres_batch([], grid_pinpoints=HIGH) == []
    qwen_singles = [tiling.qwen2vl(im, min_pixels=3136, max_pixels=50176) for im in images]
    for (a, ga), (b, gb) in zip(
        tiling.qwen2vl_batch(images, min_pixels=3136, max_pixels=50176), qwen_singles
    ):
        assert ga == gb
        np.testing.assert_array_equal(a, b)


def test_batch_releases_the_gil(rng):
    """While a batch runs on a worker thread, the main thread keeps running Python code."""
    images = [random_image(rng, 1344, 1344) for _ in range(12)]
    tiling.anyres_batch(images[:1], grid_pinpoints=HIGH, num_threads=1)  # warm up
    done = threading.Event()
    span = {}

    def work():
        span["start"] = time.perf_counter()
        tiling.anyres_batch(images, grid_pinpoints=HIGH, num_threads=1)
        span["end"] = time.perf_counter()
        done.set()

    worker = threading.Thread(target=work)
    stamps = []
    worker.start()
    while not done.is_set():
        stamps.append(time.perf_counter())
    worker.join()
    # Holding the GIL through the native call would freeze this loop for the whole call: no stamp could
    # fall in its middle half. Released, the loop runs on (a loaded machine only thins the stamps out).
    quarter = (span["end"] - span["start"]) / 4
    inside = [t for t in stamps if span["start"] + quarter < t < span["end"] - quarter]
    assert len(inside) >= 3, (len(inside), span)


def test_recycled_output_memory_is_fully_rewritten(rng):
    """Large outputs come from a buffer cache: a recycled buffer holds no trace of its last use."""
    first, second = random_image(rng, 1344, 1344), random_image(rng, 1344, 1344)
    expected = tiling.anyres(second, grid_pinpoints=HIGH)
    for dtype in ("float32", "float16"):
        a = tiling.anyres(first, grid_pinpoints=HIGH, dtype=dtype)
        a.fill(np.nan)
        del a  # its memory goes back to the cache ...
        b = tiling.anyres(second, grid_pinpoints=HIGH, dtype=dtype)  # ... and is handed out again
        assert b.flags.c_contiguous and b.flags.writeable
        np.testing.assert_array_equal(b, expected.astype(dtype))
    cached, limit = tiling.buffer_cache()
    assert 0 < cached <= limit


def test_buffer_cache_limit(rng):
    image = random_image(rng, 1344, 1344)
    _, limit = tiling.buffer_cache()
    try:
        tiling.set_buffer_cache(0)
        assert tiling.buffer_cache() == (0, 0)
        out = tiling.anyres(image, grid_pinpoints=HIGH)
        del out
        assert tiling.buffer_cache()[0] == 0  # nothing kept
        views = [tiling.anyres(image, grid_pinpoints=HIGH) for _ in range(2)]  # live arrays stay distinct
        views[0].fill(0)
        assert not np.array_equal(views[0], views[1])
    finally:
        tiling.set_buffer_cache(limit)
    with pytest.raises(InputError):
        tiling.set_buffer_cache(-1)


# ---- plans ---------------------------------------------------------------------------------------------
def test_plans_match_transformers(rng):
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 4000, 2))
        pinpoints = HIGH if rng.random() < 0.5 else LLAVA_DEFAULT
        plan = tiling.anyres_plan(h, w, grid_pinpoints=pinpoints)
        best = select_best_resolution((h, w), pinpoints)
        assert plan["best"] == tuple(best)
        assert plan["resized"] == tuple(get_patch_output_size(np.empty((3, h, w)), best, "channels_first"))
        assert plan["views"] == 1 + (best[0] // 336) * (best[1] // 336)
        min_px, max_px = int(rng.integers(1, 5000)), int(rng.integers(5000, 2_000_000))
        if max(h, w) / min(h, w) <= 200:
            assert tiling.qwen2vl_size(h, w, min_pixels=min_px, max_pixels=max_px) == smart_resize(
                h, w, 28, min_px, max_px
            )


# ---- Qwen2-VL -----------------------------------------------------------------------------------------
def test_qwen2vl_photos_match_transformers(photos):
    for image in list(photos.values())[:8]:
        pv, grid = tiling.qwen2vl(image, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
        ref, ref_grid = qwen_reference(image, 56 * 56, 28 * 28 * 1280)
        assert grid == ref_grid
        assert_matches(pv, ref, channel_axis=1)


@pytest.mark.parametrize(
    "shape,min_pixels,max_pixels",
    [
        ((1, 1), 3136, 50176),
        ((1, 150), 3136, 50176),
        ((13, 2599), 3136, 50176),  # aspect just under 200
        ((224, 224), 3136, 50176),
        ((501, 333), 3136, 50176),
        ((501, 333), 3136, 28 * 28 * 1280),
        ((2000, 1500), 3136, 28 * 28 * 1280),
        ((41, 43), 100_000, 200_000),  # upscaled to the minimum
    ],
)
def test_qwen2vl_random_images_match_transformers(shape, min_pixels, max_pixels, rng, isa):
    image = random_image(rng, *shape)
    pv, grid = tiling.qwen2vl(image, min_pixels=min_pixels, max_pixels=max_pixels)
    ref, ref_grid = qwen_reference(image, min_pixels, max_pixels)
    assert grid == ref_grid
    assert_matches(pv, ref, channel_axis=1)


def test_qwen2vl_extreme_aspect_ratio_is_an_input_error(rng):
    with pytest.raises(ValueError):
        qwen_reference(random_image(rng, 1, 300), 3136, 50176)
    with pytest.raises(InputError, match="aspect ratio"):
        tiling.qwen2vl(random_image(rng, 1, 300), min_pixels=3136, max_pixels=50176)


def test_qwen2vl_float16_and_patch_size(rng):
    image = random_image(rng, 129, 77)
    ref, ref_grid = qwen_reference(image, 1000, 40000, patch_size=16)
    half, grid = tiling.qwen2vl(image, min_pixels=1000, max_pixels=40000, patch_size=16, dtype="float16")
    assert grid == ref_grid
    np.testing.assert_array_equal(half, ref.astype(np.float16))


# ---- bad input ----------------------------------------------------------------------------------------
GOOD = np.zeros((10, 12, 3), np.uint8)
BAD_ANYRES = {
    "list_image": dict(image=[[[0, 0, 0]]]),
    "float_image": dict(image=GOOD.astype(np.float32)),
    "int16_image": dict(image=GOOD.astype(np.int16)),
    "bool_image": dict(image=GOOD.astype(bool)),
    "grey_image": dict(image=GOOD[..., 0]),
    "rgba_image": dict(image=np.zeros((10, 12, 4), np.uint8)),
    "empty_image": dict(image=np.zeros((0, 12, 3), np.uint8)),
    "too_many_pixels": dict(image=GOOD, max_image_pixels=100),
    "empty_pinpoints": dict(grid_pinpoints=[]),
    "pinpoint_not_multiple": dict(grid_pinpoints=[[336, 500]]),
    "pinpoint_zero": dict(grid_pinpoints=[[0, 336]]),
    "pinpoint_negative": dict(grid_pinpoints=[[-336, 336]]),
    "pinpoint_float": dict(grid_pinpoints=[[336.0, 672]]),
    "pinpoint_triple": dict(grid_pinpoints=[[336, 336, 336]]),
    "pinpoint_string": dict(grid_pinpoints="336x336"),
    "pinpoint_absurd": dict(grid_pinpoints=[[336 * 100, 336 * 100]]),
    "crop_zero": dict(crop_size=0),
    "crop_bool": dict(crop_size=True),
    "crop_huge": dict(crop_size=10**6),
    "dtype_int": dict(dtype="int8"),
    "mean_short": dict(mean=(0.5, 0.5)),
    "mean_nan": dict(mean=(0.5, float("nan"), 0.5)),
    "std_zero": dict(std=(0.5, 0.0, 0.5)),
    "rescale_inf": dict(rescale_factor=float("inf")),
    "resize_to_zero": dict(resize_to=0),
    "resize_to_over_limit": dict(resize_to=1344, max_image_pixels=1000),
}


@pytest.mark.parametrize("case", BAD_ANYRES)
def test_anyres_bad_input_is_an_input_error(case):
    kwargs = dict(image=GOOD, grid_pinpoints=HIGH)
    kwargs.update(BAD_ANYRES[case])
    image = kwargs.pop("image")
    with pytest.raises(InputError):
        tiling.anyres(image, **kwargs)
    with pytest.raises(InputError):
        tiling.anyres_batch([GOOD, image], **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(min_pixels=0, max_pixels=50176),
        dict(min_pixels=3136, max_pixels=-1),
        dict(min_pixels=3136, max_pixels=50176, patch_size=0),
        dict(min_pixels=3136, max_pixels=50176, merge_size=2.0),
        dict(min_pixels=3136, max_pixels=50176, temporal_patch_size=0),
        dict(min_pixels=10**8, max_pixels=2 * 10**8),  # absurd upscale
    ],
)
def test_qwen2vl_bad_input_is_an_input_error(kwargs):
    with pytest.raises(InputError):
        tiling.qwen2vl(GOOD, **kwargs)


def test_batch_errors_name_the_image_and_threads():
    with pytest.raises(InputError, match="image 1"):
        tiling.anyres_batch([GOOD, GOOD.astype(np.float32)], grid_pinpoints=HIGH)
    with pytest.raises(InputError, match="num_threads"):
        tiling.anyres_batch([GOOD], grid_pinpoints=HIGH, num_threads=-1)
    with pytest.raises(InputError):
        tiling.anyres_batch(GOOD, grid_pinpoints=HIGH)  # an array, not a list of arrays


def test_native_layer_checks_its_own_arguments():
    """_C repeats the checks (a second line of defence): wrong arguments never reach the kernels."""
    lut = np.zeros((3, 256), np.float32)
    with pytest.raises(ValueError):
        _C.anyres(GOOD.astype(np.float32), [(336, 336)], 336, lut)
    with pytest.raises(ValueError):
        _C.anyres(GOOD, [(336, 336)], 336, np.zeros((3, 255), np.float32))
    with pytest.raises(ValueError):
        _C.anyres(GOOD, [(336, 337)], 336, lut)
    with pytest.raises(ValueError):
        _C.anyres(np.zeros((4, 4, 4), np.uint8), [(336, 336)], 336, lut)
    with pytest.raises(ValueError):
        _C.resize_bicubic(GOOD, 0, 5)
    with pytest.raises(ValueError):
        _C.qwen2vl(GOOD, 14, 2, 2, 3136, 50176, lut.astype(np.float64))


# ---- property test ------------------------------------------------------------------------------------
@st.composite
def anyres_case(draw):
    crop = draw(st.sampled_from([14, 28, 56]))
    grids = st.tuples(st.integers(1, 4), st.integers(1, 4))
    pinpoints = [(crop * a, crop * b) for a, b in draw(st.lists(grids, min_size=1, max_size=6))]
    h = draw(st.integers(1, 400))
    w = draw(st.integers(1, 400))
    view = draw(st.sampled_from(["dense", "step", "flipped"]))
    dtype = draw(st.sampled_from(["float32", "float16"]))
    return crop, pinpoints, h, w, view, dtype


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(anyres_case(), st.integers(0, 2**32 - 1))
def test_anyres_never_crashes_and_has_the_documented_view_count(case, seed):
    from transformers.image_processing_utils import select_best_resolution

    crop, pinpoints, h, w, view, dtype = case
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = {"dense": image, "step": image[:, ::2] if w > 1 else image, "flipped": image[::-1]}[view]
    out = tiling.anyres(image, grid_pinpoints=pinpoints, crop_size=crop, dtype=dtype)
    best_h, best_w = select_best_resolution(image.shape[:2], pinpoints)
    views = 1 + (best_h // crop) * (best_w // crop)
    assert out.shape == (views, 3, crop, crop)
    assert out.dtype == np.dtype(dtype)
    assert tiling.anyres_plan(*image.shape[:2], grid_pinpoints=pinpoints, crop_size=crop)["views"] == views
    assert np.isfinite(out).all()


# ---- integration: the Embedder -------------------------------------------------------------------------
def test_embedder_cpp_tiling_matches_transformers(tiny_model, photos, rng):
    from vlm2vec_rt import Embedder, Item

    cpp = Embedder.from_pretrained(tiny_model)
    ref = Embedder.from_pretrained(tiny_model, tiling="transformers")
    assert cpp.pre.tiling == "cpp" and ref.pre.tiling == "transformers"  # C++ is the default
    images = [photos["astronaut"], photos["coffee"], random_image(rng, 37, 301)]
    items = [Item(image=im, text="a photo", instruction="Represent the given image.") for im in images]
    for im in images:
        a, b = cpp.pre.preprocess_image(im), ref.pre.preprocess_image(im)
        assert a.meta == b.meta and a.num_tokens == b.num_tokens
        if cpp.backbone.name == "phi3_v":  # its global view's bicubic sums in another order than torch's
            np.testing.assert_allclose(a.pixel_values, b.pixel_values, atol=1e-5)
        else:
            np.testing.assert_array_equal(a.pixel_values, b.pixel_values)
    cos = np.sum(cpp.encode(items) * ref.encode(items), axis=1)
    assert cos.min() >= 0.9999, cos


def test_unknown_tiling_is_an_input_error(tiny_llava):
    from vlm2vec_rt import Embedder

    with pytest.raises(InputError, match="tiling"):
        Embedder.from_pretrained(tiny_llava, tiling="opencv")
