"""Input side of a backbone: items -> token ids + preprocessed images -> a padded numpy batch. No weights.

The eager Embedder, the trainer and the engine runtime all prepare inputs through the same `Preprocessor`,
so an engine sees exactly the tokens and pixels the eager model saw. Per backbone only a few things differ:
the image placeholder, the image processor, how many tokens an image becomes and what each profile does;
each backbone module (vlm2vec_rt/backbones/) subclasses `Preprocessor` with those.

    Item --load_image (+ "high" resize)--> uint8 HxWx3 --image_preprocessor--> ImageInputs
    Item.format_text --placeholder expanded to ImageInputs.num_tokens--> token ids
    token ids + ImageInputs --collate (left padding)--> NumpyBatch
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import profiles
from ..errors import InputError
from ..preprocess import text as text_ops
from ..preprocess.images import DEFAULT_MAX_PIXELS, HIGH_RESOLUTION, load_image
from ..preprocess.items import Item

IMAGE_RESOLUTIONS = (None, "high")


@dataclass
class ImageInputs:
    """One preprocessed image: what the vision tower takes and how many tokens it becomes in the text."""

    pixel_values: np.ndarray  # LLaVA-NeXT: [views, 3, crop, crop]; Qwen2-VL: [patches, 3*T*P*P]
    meta: tuple[int, ...]  # LLaVA-NeXT: original (height, width); Qwen2-VL: grid (t, h, w)
    num_tokens: int


@dataclass
class NumpyBatch:
    """A collated, left-padded batch (numpy, any device-agnostic consumer: torch, onnxruntime)."""

    input_ids: np.ndarray  # [B, S] int64
    attention_mask: np.ndarray  # [B, S] int64
    pixel_values: np.ndarray | None  # every image's views / patches concatenated, float32
    image_meta: np.ndarray | None  # [num_images, 2 | 3] int64
    views_per_image: list[int]


Prepared = tuple[list[int], ImageInputs | None]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own progress bars (loading/saving shards) and its deprecation notices about
    its own internals (peft calls APIs transformers has deprecated) inside our calls."""
    import warnings

    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def read_model_type(path: str | os.PathLike) -> str:
    """The `model_type` of a model directory's config.json; InputError if it is not a supported backbone."""
    cfg_path = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise InputError(f"model directory {os.fspath(path)!r} does not exist")
    if not cfg_path.is_file():
        raise InputError(f"{os.fspath(path)!r} is not a model directory: no config.json")
    try:
        model_type = json.loads(cfg_path.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{cfg_path}: not valid JSON ({e})") from None
    from ..backbones import NAMES

    if model_type not in NAMES:
        raise InputError(
            f"{cfg_path}: model_type {model_type!r} is not a supported backbone (supported: {', '.join(NAMES)})"
        )
    return model_type


class Preprocessor:
    """Tokenizer + image processor + the model config's numbers. Subclasses hold what differs per backbone."""

    name: str = ""
    image_processor_class: str = ""  # transformers' Pillow image processor, the reference path

    def __init__(
        self,
        config: Any,
        tokenizer: Any,
        image_processor: Any,
        *,
        image_resolution: str | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        tiling: str = "cpp",
        profile: str = profiles.DEFAULT_PROFILE,
    ):
        if image_resolution not in IMAGE_RESOLUTIONS:
            raise InputError(f"image_resolution must be None or 'high', got {image_resolution!r}")
        self.profile = profile
        self.recipe = self.recipe_of(profiles.check_profile(profile))
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_resolution = image_resolution
        self.max_image_pixels = max_image_pixels
        self.image_token_id = int(config.image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))
        self.max_length = text_ops.model_max_length(
            tokenizer, getattr(config.text_config, "max_position_embeddings", None)
        )
        # The seam the C++ tiling plugs into: uint8 HxWx3 -> ImageInputs.
        self.image_preprocessor: Callable[[np.ndarray], ImageInputs] = self.preprocess_with_transformers
        self.use_tiling(tiling)

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any) -> Preprocessor:
        """Read config, tokenizer and image processor configuration from a model (or engine) directory.

        Keywords: those of the constructor (image_resolution, max_image_pixels, tiling, profile).
        """
        import transformers

        try:
            with quiet_transformers():
                config = transformers.AutoConfig.from_pretrained(path)
                tokenizer = transformers.AutoTokenizer.from_pretrained(path)
                image_processor = getattr(transformers, cls.image_processor_class).from_pretrained(path)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise InputError(
                f"cannot load the {cls.name} tokenizer/processor from {os.fspath(path)!r}: {e}"
            ) from None
        return cls(config, tokenizer, image_processor, **kwargs)

    def save(self, path: str | os.PathLike) -> None:
        """Write config, tokenizer and image processor configuration (what `load` reads) into `path`."""
        with quiet_transformers():
            self.config.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            self.image_processor.save_pretrained(path)

    # ---- per backbone --------------------------------------------------------------------------------
    placeholder: str = ""  # what replaces MMEB's <|image_1|>

    @classmethod
    def recipe_of(cls, profile: str) -> profiles.Recipe:
        """What `profile` does on this backbone (vlm2vec_rt.profiles): by default its generic recipe."""
        return profiles.generic_recipe(profile)

    def cpp_options(self) -> dict[str, Any]:
        """The C++ tiling's keywords for this processor configuration (InputError if it cannot reproduce it)."""
        raise NotImplementedError

    def preprocess_with_transformers(self, image: np.ndarray) -> ImageInputs:
        """The reference image path: transformers' Pillow image processor."""
        raise NotImplementedError

    def preprocess_with_cpp(self, image: np.ndarray) -> ImageInputs:
        """The fast image path: the C++ tiling (vlm2vec_rt.tiling), same values, no GIL held."""
        raise NotImplementedError

    def use_tiling(self, tiling: str) -> None:
        """Images through the C++ tiling ("cpp", the default) or transformers' image processor ("transformers")."""
        if tiling == "cpp":
            # Checked now: a processor configuration the C++ path cannot reproduce fails at load, not per image.
            self.tiling_options = self.cpp_options()
            self.image_preprocessor = self.preprocess_with_cpp
        elif tiling == "transformers":
            self.image_preprocessor = self.preprocess_with_transformers
        else:
            raise InputError(f"tiling must be 'cpp' or 'transformers', got {tiling!r}")
        self.tiling = tiling

    # ---- items ---------------------------------------------------------------------------------------
    def load_pixels(self, image: Any) -> np.ndarray:
        """Decode, validate and (at "high" resolution, or as the profile says) resize one image to uint8 HxWx3."""
        return load_image(image, max_pixels=self.max_image_pixels, size=self.resize_to)

    def resize_to(self, width: int, height: int) -> tuple[int, int] | None:
        """The size an image of this size is resized to before the image processor (None: kept)."""
        if self.image_resolution == "high":
            return (HIGH_RESOLUTION, HIGH_RESOLUTION)
        small = self.recipe.small_image
        if small is not None and min(width, height) < small[0]:
            return small[1]
        return None

    def preprocess_image(self, image: np.ndarray) -> ImageInputs:
        return self.image_preprocessor(image)

    def preprocess_images(self, images: Sequence[np.ndarray]) -> list[ImageInputs]:
        """`preprocess_image` of several images; the C++ path tiles them on all cores at once (no GIL)."""
        if self.image_preprocessor == self.preprocess_with_cpp and len(images) > 1:
            return self.preprocess_batch_with_cpp(images)
        return [self.preprocess_image(im) for im in images]

    def preprocess_batch_with_cpp(self, images: Sequence[np.ndarray]) -> list[ImageInputs]:
        raise NotImplementedError

    def tokenize(self, text: str, image: ImageInputs | None, what: str = "item") -> list[int]:
        """Token ids of an MMEB-formatted text, the image placeholder expanded to the image's token count."""
        expanded = text_ops.expand_placeholder(
            text, self.placeholder, self.image_token, None if image is None else image.num_tokens
        )
        return text_ops.tokenize(
            self.tokenizer,
            expanded,
            image_token_id=self.image_token_id,
            num_image_tokens=0 if image is None else image.num_tokens,
            max_length=self.max_length,
            what=what,
        )

    def prepare(self, item: Item, what: str = "item") -> Prepared:
        """Token ids and preprocessed image of one item."""
        image = None
        if item.image is not None:
            image = self.preprocess_image(self.load_pixels(item.image))
        return self.tokenize(item.format_text(self.recipe.text_style), image, what=what), image

    def prepare_many(self, items: Sequence[Item], offset: int = 0) -> list[Prepared]:
        """`prepare` over items, the images tiled together; errors name the item's index (offset + position)."""
        pixels: dict[int, np.ndarray] = {}
        for j, item in enumerate(items):
            if item.image is not None:
                with _naming_item(offset + j):
                    pixels[j] = self.load_pixels(item.image)
        try:
            images = dict(zip(pixels, self.preprocess_images(list(pixels.values()))))
        except InputError:
            images = {}  # find which item it was: one at a time
            for j, px in pixels.items():
                with _naming_item(offset + j):
                    images[j] = self.preprocess_image(px)
        out = []
        for j, item in enumerate(items):
            with _naming_item(offset + j):
                out.append(
                    (
                        self.tokenize(
                            item.format_text(self.recipe.text_style), images.get(j), what=f"item {offset + j}"
                        ),
                        images.get(j),
                    )
                )
        return out

    def collate(self, prepared: Sequence[Prepared]) -> NumpyBatch:
        """Left-pad token ids and concatenate the images' pixel values."""
        ids, mask = text_ops.left_pad([p[0] for p in prepared], self.pad_id)
        images = [p[1] for p in prepared if p[1] is not None]
        pixel_values = image_meta = None
        if images:
            pixel_values = np.concatenate([im.pixel_values for im in images]).astype(np.float32, copy=False)
            image_meta = np.array([im.meta for im in images], dtype=np.int64)
        return NumpyBatch(ids, mask, pixel_values, image_meta, [im.pixel_values.shape[0] for im in images])


@contextlib.contextmanager
def _naming_item(index: int) -> Iterator[None]:
    """Prefix an InputError's message with the item's index (once)."""
    try:
        yield
    except InputError as e:
        msg = str(e)
        raise InputError(msg if msg.startswith("item ") else f"item {index}: {msg}") from None


def load_preprocessor(path: str | os.PathLike, **kwargs: Any) -> Preprocessor:
    """The input side of the model directory at `path` (no weights are read)."""
    from ..backbones import entry

    return entry(read_model_type(path)).preprocessor.load(path, **kwargs)
