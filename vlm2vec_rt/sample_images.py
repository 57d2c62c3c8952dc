"""Real images that installed packages ship (scikit-learn, scikit-image), as uint8 HxWx3 RGB arrays.

The demo, the bundled benchmark, the tests and the benchmarks all draw on these; nothing is downloaded.
Needs the `data` extra (scikit-learn, scikit-image).
"""

from __future__ import annotations

import functools

import numpy as np

from .errors import InputError
from .preprocess.images import load_image

# scikit-image photos that ship inside the package (no download), with a short caption each.
SKIMAGE_PHOTOS = {
    "astronaut": "an astronaut in a space suit posing in front of a flag",
    "coffee": "a cup of coffee on a saucer seen from above",
    "chelsea": "a tabby cat looking to the side",
    "rocket": "a rocket standing on its launch pad",
    "hubble_deep_field": "a deep field of distant galaxies in space",
    "immunohistochemistry": "a stained tissue sample under a microscope",
    "colorwheel": "a color wheel with a rainbow of hues",
    "retina": "a photograph of the retina of a human eye",
    "camera": "a black and white photo of a man with a camera on a tripod",
    "coins": "old coins lying on a dark background",
    "moon": "the surface of the moon with craters",
    "text": "printed text on a page at an angle",
    "page": "a page of a book with printed text",
    "brick": "a brick wall texture",
    "grass": "a close view of green grass",
    "gravel": "small stones of gravel",
    "clock": "a clock on a wall",
    "logo": "the scikit-image logo with a snake",
}


def _require(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise InputError(
            f"the sample images need {module.split('.')[0]} (pip install 'vlm2vec-rt[data]'): {e}"
        ) from None


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Grey, boolean or RGBA arrays -> uint8 HxWx3 (alpha composited onto white, as load_image does)."""
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    return load_image(a, max_pixels=a.shape[0] * a.shape[1] or 1)


@functools.cache
def photos() -> dict[str, np.ndarray]:
    """Named real photos: scikit-learn's two sample images and scikit-image's bundled data, RGB uint8."""
    datasets = _require("sklearn.datasets")
    skdata = _require("skimage.data")
    out: dict[str, np.ndarray] = {}
    sample = datasets.load_sample_images()
    for fname, img in zip(sample.filenames, sample.images):
        out[fname.rsplit("/", 1)[-1].split(".")[0]] = to_rgb(img)  # china, flower
    for name in SKIMAGE_PHOTOS:
        out[name] = to_rgb(getattr(skdata, name)())
    for img in out.values():
        img.setflags(write=False)
    return out


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: (images uint8 [1797, 8, 8] in 0..255, labels int64 [1797])."""
    datasets = _require("sklearn.datasets")
    d = datasets.load_digits()
    images = np.rint(d.images / 16.0 * 255.0).astype(np.uint8)
    images.setflags(write=False)
    return images, d.target.astype(np.int64)
