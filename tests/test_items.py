"""Item validation, MMEB text formatting, and JSONL item files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlm2vec_rt import InputError, Item
from vlm2vec_rt.preprocess.items import MMEB_IMAGE_PLACEHOLDER, as_items, read_jsonl_items


def test_format_text_follows_mmeb_rows():
    # MMEB-train writes "<|image_1|>\n" + instruction + text + "\n"
    item = Item(
        text="What is on the table?",
        image=np.zeros((4, 4, 3), np.uint8),
        instruction="Represent the given image with the following question: ",
    )
    assert item.format_text() == (
        "<|image_1|>\nRepresent the given image with the following question: What is on the table?\n"
    )
    assert Item(image=b"x", instruction="Represent the given image.").format_text() == (
        "<|image_1|>\nRepresent the given image.\n"
    )
    assert Item(text="plane").format_text() == "plane"
    # an instruction without trailing space gets one before the text
    assert Item(text="a dog", instruction="Find:").format_text() == "Find: a dog\n"


def test_text_with_placeholder_is_kept_in_place():
    text = f"Find the image. {MMEB_IMAGE_PLACEHOLDER} Represent it."
    assert Item(text=text, image=b"x").format_text() == text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "neither text nor image"),
        (dict(text="   "), "neither text nor image"),
        (dict(text=""), "neither text nor image"),
        (dict(text=3), "must be a str"),
        (dict(text="x", instruction=1), "instruction must be a str"),
        (dict(image=3.5), "Item.image must be"),
        (dict(text=f"{MMEB_IMAGE_PLACEHOLDER} hi"), "no image"),
    ],
)
def test_bad_items(kwargs, match):
    with pytest.raises(InputError, match=match):
        Item(**kwargs)


def test_as_items_accepts_strings_and_pil_images():
    from PIL import Image

    img = Image.new("RGB", (3, 2))
    items = as_items(["hello", img, Item(text="x")])
    assert items[0].text == "hello" and items[1].image is img and items[2].text == "x"
    with pytest.raises(InputError, match="item 1"):
        as_items(["ok", 17])
    with pytest.raises(InputError, match="sequence"):
        as_items("just a string")


def test_read_jsonl_items(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not really an image")  # existence is what the reader checks
    f = tmp_path / "items.jsonl"
    f.write_text(
        json.dumps({"text": "hello"})
        + "\n\n"
        + json.dumps({"image": "a.png", "instruction": "Represent the given image."})
        + "\n"
    )
    items = read_jsonl_items(f, instruction="default: ")
    assert items[0].instruction == "default: " and items[0].text == "hello"
    assert items[1].image == str(tmp_path / "a.png") and items[1].instruction == "Represent the given image."


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", "line 1: not valid JSON"),
        ("[1, 2]", "line 1: expected a JSON object"),
        ('{"txt": "typo"}', "unknown field"),
        ('{"image": "missing.png"}', "does not exist"),
        ('{"text": ""}', "neither text nor image"),
    ],
)
def test_read_jsonl_errors_name_the_line(tmp_path, line, match):
    f = tmp_path / "items.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(InputError, match=match) as e:
        read_jsonl_items(f)
    assert str(f) in str(e.value)
