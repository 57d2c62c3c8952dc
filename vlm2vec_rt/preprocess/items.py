"""`Item`: one input to embed (text, image, instruction), and the normalisation of what `encode` accepts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError

# The image placeholder MMEB writes into its texts (Phi-3.5-V's); replaced per backbone.
MMEB_IMAGE_PLACEHOLDER = "<|image_1|>"


@dataclass(frozen=True, eq=False)
class Item:
    """One thing to embed.

    text: the text, or None. image: a path, encoded bytes, a PIL image or a uint8 HxWx3 array, or None.
    instruction: the MMEB task instruction, prepended as MMEB does. The backbone's image placeholder is
    inserted by the library; a text that already carries MMEB's ``<|image_1|>`` keeps it in place.
    """

    text: str | None = None
    image: Any = None
    instruction: str | None = None

    def __post_init__(self) -> None:
        for name in ("text", "instruction"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise InputError(f"Item.{name} must be a str or None, got {type(value).__name__}")
            check_unicode(value, f"Item.{name}")
        accepted = (str, os.PathLike, bytes, bytearray, np.ndarray)
        if self.image is not None and not isinstance(self.image, accepted) and not _is_pil_image(self.image):
            raise InputError(
                "Item.image must be a path, bytes, a PIL.Image or a uint8 HxWx3 numpy array, "
                f"got {type(self.image).__name__}"
            )
        has_text = bool((self.text or "").strip()) or bool((self.instruction or "").strip())
        if self.image is None and not has_text:
            raise InputError("Item has neither text nor image (empty text with no image)")
        if self.image is None and self.text and MMEB_IMAGE_PLACEHOLDER in self.text:
            raise InputError(
                f"Item.text contains the image placeholder {MMEB_IMAGE_PLACEHOLDER} but no image is given"
            )

    def format_text(self, style: str = "v1") -> str:
        """The item's text the way MMEB writes it, with MMEB's placeholder where the image goes.

        style "v1" (the official VLM2Vec V1 data): ``"<|image_1|>\\n" + instruction + text + "\\n"``, a space
        between instruction and text unless the instruction ends in whitespace. style "v2" (the official V2
        code): ``"<|image_1|> " + instruction + " " + text``, then " \\n" -> "\\n" and a final "\\n". Either way
        a bare text stays as it is, and a text that already holds the placeholder (rows read straight from
        MMEB files) keeps it where it is.
        """
        text = self.text or ""
        placed = MMEB_IMAGE_PLACEHOLDER in text
        if style == "v2":
            # V2's instructions carry no trailing space: it joins the parts with one
            body = " ".join(part for part in ((self.instruction or "").rstrip(), text) if part)
            if self.image is not None and not placed:
                body = (
                    f"{MMEB_IMAGE_PLACEHOLDER} {body}".replace(" \n", "\n")
                    if body
                    else MMEB_IMAGE_PLACEHOLDER
                )
            return f"{body}\n" if self.instruction or (self.image is not None and not placed) else body
        if style != "v1":
            raise InputError(f"text style must be 'v1' or 'v2', got {style!r}")
        if self.instruction:
            sep = "" if not text or self.instruction[-1:].isspace() else " "
            text = f"{self.instruction}{sep}{text}\n"
        if self.image is not None and not placed:
            text = f"{MMEB_IMAGE_PLACEHOLDER}\n{text}"
        return text


def check_unicode(text: str, what: str) -> None:
    """InputError unless `text` is encodable Unicode: a lone surrogate (from a bad JSON escape such as
    "\\ud800", or undecodable bytes on a command line) is not text a tokenizer can read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"{what} is not valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start}"
        ) from None


def _is_pil_image(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a core dependency
        return False
    return isinstance(obj, Image.Image)


def as_items(inputs: Sequence[Any]) -> list[Item]:
    """Normalise what `encode` accepts (Item, str for text, PIL.Image for an image) into Items."""
    if isinstance(inputs, (str, Item)) or _is_pil_image(inputs):
        raise InputError("encode takes a sequence of items; wrap a single item in a list")
    if isinstance(inputs, (bytes, bytearray, dict)) or not hasattr(inputs, "__iter__"):
        raise InputError(
            f"encode takes a sequence of items (Item, str or PIL.Image), got {type(inputs).__name__}"
        )
    items: list[Item] = []
    for i, x in enumerate(inputs):
        try:
            if isinstance(x, Item):
                items.append(x)
            elif isinstance(x, str):
                items.append(Item(text=x))
            elif _is_pil_image(x):
                items.append(Item(image=x))
            else:
                raise InputError(f"expected Item, str or PIL.Image, got {type(x).__name__}")
        except InputError as e:
            raise InputError(f"item {i}: {e}") from None
    return items


def read_jsonl_items(path: str | os.PathLike, *, instruction: str | None = None) -> list[Item]:
    """Items from a JSONL file, one object per line with "text", "image" (path), "instruction" keys.

    The file is UTF-8 (a byte-order mark is allowed). Relative image paths are resolved against the file's
    folder; `instruction` is the default for lines that give none. Errors name the file and line.
    """
    import json

    path = os.fspath(path)
    if not path:
        raise InputError("input file name is empty")
    if not os.path.isfile(path):
        raise InputError(f"input file {path!r} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    items: list[Item] = []
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise InputError(f"input file {path!r} cannot be read: {e.strerror or e}") from None
    for lineno, raw in enumerate(lines, 1):
        where = f"{path}, line {lineno}"
        line = _decode_line(raw, lineno, where)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:  # JSONDecodeError, or an integer too long to convert
            raise InputError(f"{where}: not valid JSON ({getattr(e, 'msg', e)})") from None
        except RecursionError:
            raise InputError(f"{where}: not valid JSON (nested too deeply)") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object")
        unknown = set(row) - {"text", "image", "instruction"}
        if unknown:
            raise InputError(f"{where}: unknown field(s) {sorted(unknown)}")
        image = row.get("image")
        if image is not None:
            if not isinstance(image, str) or not image:
                raise InputError(f"{where}: field 'image' must be a non-empty path string")
            try:
                check_unicode(image, "field 'image'")
            except InputError as e:
                raise InputError(f"{where}: {e}") from None
            image = os.path.join(base, image)
            if not os.path.isfile(image):
                raise InputError(f"{where}: image file {image!r} does not exist")
        try:
            items.append(
                Item(text=row.get("text"), image=image, instruction=row.get("instruction", instruction))
            )
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    if not items:
        raise InputError(f"input file {path!r} has no items")
    return items


_UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")


def _decode_line(raw: bytes, lineno: int, where: str) -> str:
    """One line of a JSONL file as text: UTF-8, the first line's byte-order mark dropped."""
    if lineno == 1:
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        elif raw.startswith(_UTF16_32_BOMS):
            raise InputError(f"{where}: the file is UTF-16 or UTF-32; JSONL input must be UTF-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); "
            "JSONL input must be UTF-8"
        ) from None


def string_cell(value, where: str, column: str) -> str:
    """A parquet string cell: "" for null, InputError naming the row and column for anything but a str."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{where}: column {column!r} must hold a string, got {type(value).__name__}")
    return value
