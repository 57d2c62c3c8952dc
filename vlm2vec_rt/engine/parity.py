"""The parity gate every build passes: engine vs eager fp32 embeddings on generated text and image inputs."""

from __future__ import annotations

import logging

import numpy as np

from ..errors import EngineError, InputError
from ..preprocess.items import Item

log = logging.getLogger("vlm2vec_rt")

MAX_NORM_ERROR = 1e-3  # | ||row|| - 1 | an engine's embeddings may have (fp16's final L2 runs in fp32)

_TEXTS = [
    ("Find me an everyday image that matches the given caption: ", "a dog running on the beach"),
    (None, "plane"),
    ("Represent the given image with the following question: ", "What color is the umbrella?"),
    (None, "The man is holding a red umbrella while walking down the street in the rain. " * 3),
]
# (photo, crop as (rows, cols) slices or None, text): aspect ratios wide, tall, square, tiny
_IMAGES = [
    ("chelsea", None, None),
    ("coffee", (slice(0, 150), slice(0, 400)), "What is in the cup?"),
    ("astronaut", (slice(0, 512, 3), slice(100, 300, 2)), None),
    ("rocket", (slice(0, 31), slice(0, 17)), "odd sized crop"),
    ("coins", None, "old coins"),
]


def _synthetic_photos(names: list[str]) -> dict[str, np.ndarray]:
    """Stand-ins when the sample photos' packages (the `data` extra) are missing: smooth colour fields
    with noise, of different sizes (never constant)."""
    rng = np.random.default_rng(0)
    out = {}
    for k, name in enumerate(names):
        h, w = 200 + 37 * k, 300 - 23 * k
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x / w, y / h, (x + y) / (h + w)], axis=-1) * 255
        out[name] = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return out


def parity_items() -> list[Item]:
    """Text, image and image+text items of varied lengths and image shapes (real photos when available)."""
    names = [name for name, _, _ in _IMAGES]
    try:
        from ..sample_images import photos

        pics = photos()
    except InputError as e:
        log.warning("parity gate uses synthetic images: %s", e)
        pics = _synthetic_photos(names)
    items = [Item(text=t, instruction=i) for i, t in _TEXTS]
    for name, crop, text in _IMAGES:
        image = pics[name] if crop is None else np.ascontiguousarray(pics[name][crop])
        items.append(Item(image=image, text=text, instruction="Represent the given image."))
    return items


def parity_report(engine, expected: np.ndarray, threshold: float, *, batch_size: int = 3) -> dict:
    """Cosine between the engine's embeddings of `parity_items()` and `expected` (eager fp32's, unit rows,
    computed before the build freed the model); EngineError below `threshold` or when the engine's rows are
    not unit-norm (within MAX_NORM_ERROR): users take dot products as cosines."""
    items = parity_items()
    ref = np.asarray(expected, dtype=np.float32)
    if ref.shape[0] != len(items):
        raise EngineError(f"parity gate: {ref.shape[0]} reference embeddings for {len(items)} parity items")
    got = engine.encode(items, batch_size=batch_size)
    if not np.isfinite(got).all():
        raise EngineError("parity gate failed: the engine produced non-finite embeddings")
    norms = np.linalg.norm(got, axis=1)
    # a true cosine, so a scaled output cannot pass on its length; a zero row gets cosine 0
    cos = (ref * got).sum(1) / np.maximum(norms, np.finfo(np.float32).tiny)
    norm_error = np.abs(norms - 1)
    report = {
        "reference": "eager fp32",
        "items": len(items),
        "threshold": threshold,
        "min_cosine": round(float(cos.min()), 7),
        "mean_cosine": round(float(cos.mean()), 7),
        "max_norm_error": round(float(norm_error.max()), 7),
        "max_norm_error_allowed": MAX_NORM_ERROR,
    }
    if cos.min() < threshold:
        worst = int(cos.argmin())
        raise EngineError(
            f"parity gate failed: cosine to eager fp32 is {cos.min():.6f} on parity item {worst} "
            f"(threshold {threshold}); the engine is not written"
        )
    if norm_error.max() > MAX_NORM_ERROR:
        worst = int(norm_error.argmax())
        raise EngineError(
            f"parity gate failed: the engine's embedding of parity item {worst} has norm {norms[worst]:.6f}, "
            f"not 1 (allowed error {MAX_NORM_ERROR}); the engine is not written"
        )
    return report
