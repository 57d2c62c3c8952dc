"""Input side of a backbone: items -> token ids + preprocessed images -> a padded numpy batch. No weights.

The eager Embedder, the trainer and the engine runtime all prepare inputs through the same `Preprocessor`,
so an engine sees exactly the tokens and pixels the eager model saw. Per backbone only a few things differ
(STYLE.md): the image placeholder, the image processor, and how many tokens an image becomes.

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

SUPPORTED = ("llava_next", "qwen2_vl")
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
    if model_type not in SUPPORTED:
        raise InputError(
            f"{cfg_path}: model_type {model_type!r} is not a supported backbone (supported: {', '.join(SUPPORTED)})"
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
        self.recipe = profiles.recipe(profile, self.name)
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

    def preprocess_with_transformers(self, image: np.ndarray) -> ImageInputs:
        """The reference image path: transformers' Pillow image processor."""
        raise NotImplementedError

    def preprocess_with_cpp(self, image: np.ndarray) -> ImageInputs:
        """The fast image path: the C++ tiling (vlm2vec_rt.tiling), same values, no GIL held."""
        raise NotImplementedError

    def use_tiling(self, tiling: str) -> None:
        """Images through the C++ tiling ("cpp", the default) or transformers' image processor ("transformers")."""
        from ..preprocess import tiling as tiling_ops

        if tiling == "cpp":
            # Checked now: a processor configuration the C++ path cannot reproduce fails at load, not per image.
            options = {"llava_next": tiling_ops.llava_next_options, "qwen2_vl": tiling_ops.qwen2vl_options}
            self.tiling_options = options[self.name](self.image_processor)
            if self.recipe.pixel_limits is not None:
                self.tiling_options.update(zip(("min_pixels", "max_pixels"), self.recipe.pixel_limits))
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


class LlavaNextPreprocessor(Preprocessor):
    """LLaVA-NeXT: placeholder `<image>`; anyres views; base + unpadded grid + row newlines as tokens."""

    name = "llava_next"
    image_processor_class = "LlavaNextImageProcessorPil"

    @property
    def placeholder(self) -> str:  # type: ignore[override]
        return self.image_token

    @property
    def crop_size(self) -> int:
        return int(self.config.vision_config.image_size)

    @property
    def patch_size(self) -> int:
        return int(self.config.vision_config.patch_size)

    @property
    def grid_pinpoints(self) -> list[list[int]]:
        return [list(p) for p in self.image_processor.image_grid_pinpoints]

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens LLaVA-NeXT spends on an image of this size."""
        return llava_next_num_tokens(height, width, self.grid_pinpoints, self.crop_size, self.patch_size)

    def preprocess_with_transformers(self, image: np.ndarray) -> ImageInputs:
        out = self.image_processor(image, return_tensors="np", input_data_format="channels_last")
        pixel_values = np.asarray(out["pixel_values"][0], dtype=np.float32)
        h, w = image.shape[:2]
        return ImageInputs(pixel_values, (h, w), self.num_image_tokens(h, w))

    def preprocess_with_cpp(self, image: np.ndarray) -> ImageInputs:
        from ..preprocess import tiling

        pixel_values = tiling.anyres(image, max_image_pixels=self.max_image_pixels, **self.tiling_options)
        h, w = image.shape[:2]
        return ImageInputs(pixel_values, (h, w), self.num_image_tokens(h, w))

    def preprocess_batch_with_cpp(self, images: Sequence[np.ndarray]) -> list[ImageInputs]:
        from ..preprocess import tiling

        views = tiling.anyres_batch(images, max_image_pixels=self.max_image_pixels, **self.tiling_options)
        return [
            ImageInputs(v, im.shape[:2], self.num_image_tokens(*im.shape[:2])) for v, im in zip(views, images)
        ]


def llava_next_num_tokens(height: int, width: int, grid_pinpoints, crop_size: int, patch_size: int) -> int:
    """LLaVA-NeXT's image token count for an original (height, width): same arithmetic as its processor.

    Base view (side^2) + the grid's features with the padding rows/columns removed + one newline per row.
    """
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution((height, width), grid_pinpoints)
    side = crop_size // patch_size
    cur_h, cur_w = side * (best_h // crop_size), side * (best_w // crop_size)
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    return cur_h * cur_w + cur_h + side * side


class Qwen2VLPreprocessor(Preprocessor):
    """Qwen2-VL: placeholder a bare `<|image_pad|>` run (the official VLM2Vec code's) or, under the native
    profile, wrapped in `<|vision_start|>`/`<|vision_end|>`; native resolution, 2x2 merge."""

    name = "qwen2_vl"
    image_processor_class = "Qwen2VLImageProcessorPil"

    @property
    def placeholder(self) -> str:  # type: ignore[override]
        if self.recipe.vision_markers:
            return f"<|vision_start|>{self.image_token}<|vision_end|>"
        return self.image_token

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def preprocess_with_transformers(self, image: np.ndarray) -> ImageInputs:
        # the profile's pixel limits win over the checkpoint's (given per call: what is saved stays the checkpoint's)
        limits = self.recipe.pixel_limits
        size = {} if limits is None else {"size": {"shortest_edge": limits[0], "longest_edge": limits[1]}}
        try:
            out = self.image_processor(image, return_tensors="np", input_data_format="channels_last", **size)
        except ValueError as e:  # e.g. an aspect ratio over 200
            raise InputError(f"image {image.shape[1]}x{image.shape[0]}: {e}") from None
        grid = tuple(int(v) for v in out["image_grid_thw"][0])
        pixel_values = np.asarray(out["pixel_values"], dtype=np.float32)
        return ImageInputs(pixel_values, grid, int(np.prod(grid)) // self.merge_size**2)

    def preprocess_with_cpp(self, image: np.ndarray) -> ImageInputs:
        from ..preprocess import tiling

        pixel_values, grid = tiling.qwen2vl(
            image, max_image_pixels=self.max_image_pixels, **self.tiling_options
        )
        return ImageInputs(pixel_values, grid, int(np.prod(grid)) // self.merge_size**2)

    def preprocess_batch_with_cpp(self, images: Sequence[np.ndarray]) -> list[ImageInputs]:
        from ..preprocess import tiling

        out = tiling.qwen2vl_batch(images, max_image_pixels=self.max_image_pixels, **self.tiling_options)
        return [ImageInputs(pv, grid, int(np.prod(grid)) // self.merge_size**2) for pv, grid in out]


PREPROCESSORS: dict[str, type[Preprocessor]] = {
    "llava_next": LlavaNextPreprocessor,
    "qwen2_vl": Qwen2VLPreprocessor,
}


def load_preprocessor(path: str | os.PathLike, **kwargs: Any) -> Preprocessor:
    """The input side of the model directory at `path` (no weights are read)."""
    return PREPROCESSORS[read_model_type(path)].load(path, **kwargs)
