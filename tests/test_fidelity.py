"""Fidelity: under each profile, items embed as the official VLM2Vec code embeds them.

The reference side is written here from the official recipe (docs/fidelity.md) with transformers' own
image processors, tokenizers and models, none of vlm2vec_rt's preprocessing:
  image:  PIL.Image.open, then at "high" `img.resize((1344, 1344))` in the image's own mode (V2: a side
          under 28 px -> `img.resize((56, 56))`), then the processor (which converts to RGB);
  text:   the row's `<|image_1|>` replaced by the backbone's token, expanded to the image's token count;
          tokenised as one string (LLaVA's tokenizer adds <s>, Qwen2's adds nothing);
  model:  one item at a time, unpadded; Qwen2-VL positions 0..L-1 in all three sections (no
          <|vision_start|>, so the official get_rope_index counts no image); native: transformers' M-RoPE;
  pool:   the final hidden state of the last token, L2-normalised.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_FIXTURES
from PIL import Image

from vlm2vec_rt import Embedder, Item
from vlm2vec_rt.preprocess.items import MMEB_IMAGE_PLACEHOLDER

ROWS = {  # MMEB-eval rows as the parquet files hold them: instruction and placeholder already in the text
    "image+text": "<|image_1|>\nRepresent the given image with the following question: What is in the image?\n",
    "image": "<|image_1|>\nRepresent the given image.\n",
    "text": "Find me an everyday image that matches the given caption: A cat sitting on a table.\n",
}


@pytest.fixture(scope="module")
def images(tmp_path_factory, photos) -> dict[str, str]:
    """Image files of the modes and sizes that take different paths: palette, grey, RGBA, 1-bit, tiny, big."""
    folder = tmp_path_factory.mktemp("fidelity_images")
    photo = Image.fromarray(photos["chelsea"])
    made = {
        "photo.jpg": photo,
        "palette.png": photo.resize((173, 131)).quantize(colors=37),
        "grey.png": photo.convert("L").resize((97, 150)),
        "rgba.png": Image.fromarray(
            np.dstack(
                [np.asarray(photo.resize((120, 90))), np.tile(np.arange(120, dtype=np.uint8) * 2, (90, 1))]
            )
        ),
        "bilevel.png": photo.convert("1").resize((60, 45)),
        "tiny.png": photo.resize((20, 20)),
        "big.jpg": photo.resize((1344, 1344)),
    }
    paths = {}
    for name, img in made.items():
        img.save(folder / name)
        paths[name] = str(folder / name)
    return paths


# ---- the official recipe, written from the official code -------------------------------------------------
def follows_v2(backbone: str, profile: str) -> bool:
    """Whether the official V2 code's Qwen recipe applies (Qwen2.5-VL only ever ran there)."""
    return backbone != "llava_next" and (
        profile == "vlm2vec-v2" or (backbone == "qwen2_5_vl" and profile == "vlm2vec")
    )


def official_image(path: str, resolution: str | None, profile: str, backbone: str) -> Image.Image:
    image = Image.open(path)
    if resolution == "high":
        image = image.resize((1344, 1344))
    if follows_v2(backbone, profile) and min(image.size) < 28:
        image = image.resize((56, 56))  # V2's Qwen input function
    return image


class Official:
    """The official pipeline's inputs and embedding of one (text, image) item, on a model directory."""

    def __init__(self, model_dir: str, profile: str):
        self.profile = profile
        self.config = transformers.AutoConfig.from_pretrained(model_dir)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.qwen = self.config.model_type != "llava_next"
        self.v2 = follows_v2(self.config.model_type, profile)
        if self.qwen:
            self.image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(model_dir)
            model_class = {
                "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
                "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
            }[self.config.model_type]
        else:
            self.processor = transformers.LlavaNextProcessor(
                image_processor=transformers.LlavaNextImageProcessorPil.from_pretrained(model_dir),
                tokenizer=self.tokenizer,
                patch_size=self.config.vision_config.patch_size,
                vision_feature_select_strategy=self.config.vision_feature_select_strategy,
                num_additional_image_tokens=1,  # CLIP's CLS, as llava-hf's processor config says
            )
            model_class = transformers.LlavaNextForConditionalGeneration
        self.model = model_class.from_pretrained(model_dir, dtype=torch.float32).eval()

    def inputs(self, text: str, image: Image.Image | None) -> dict[str, torch.Tensor]:
        if not self.qwen:
            text = text.replace(MMEB_IMAGE_PLACEHOLDER, "<image>")
            return dict(
                self.processor(text=[text], images=None if image is None else [image], return_tensors="pt")
            )
        token = "<|image_pad|>"
        marked = "<|vision_start|><|image_pad|><|vision_end|>" if self.profile == "native" else token
        text = text.replace(MMEB_IMAGE_PLACEHOLDER, marked)
        out = {}
        if image is not None:
            size = {}
            if self.v2:  # V2 passes its pixel limits through `size`
                size = {"size": {"shortest_edge": 3136, "longest_edge": 1003520}}
            pixels = self.image_processor(image, return_tensors="pt", **size)
            grid = pixels["image_grid_thw"]
            text = text.replace(token, token * int(grid.prod() // 4), 1)
            out.update(pixel_values=pixels["pixel_values"], image_grid_thw=grid)
        ids = torch.tensor([self.tokenizer(text)["input_ids"]])
        out.update(input_ids=ids, attention_mask=torch.ones_like(ids))
        return out

    @torch.no_grad()
    def embed(self, inputs: dict[str, torch.Tensor]) -> np.ndarray:
        inputs = dict(inputs)
        if self.qwen:
            ids = inputs["input_ids"]
            if self.profile == "native":
                inputs["mm_token_type_ids"] = (ids == self.config.image_token_id).int()
            else:
                inputs["position_ids"] = torch.arange(ids.shape[1]).expand(3, 1, -1)
        hidden = self.model.model(**inputs).last_hidden_state[0, -1]
        return torch.nn.functional.normalize(hidden.float(), dim=-1).numpy()


CASES = [
    ("llava_next", "vlm2vec"),
    ("llava_next", "vlm2vec-v2"),
    ("qwen2_vl", "vlm2vec"),
    ("qwen2_vl", "vlm2vec-v2"),
    ("qwen2_vl", "native"),
    ("qwen2_5_vl", "vlm2vec"),
    ("qwen2_5_vl", "native"),
]


@pytest.mark.parametrize("backbone, profile", CASES)
@pytest.mark.parametrize("resolution", [None, "high"])
def test_tokens_pixels_and_embeddings_equal_the_official_pipeline(
    backbone, profile, resolution, images, request
):
    model_dir = request.getfixturevalue(TINY_FIXTURES[backbone])
    official = Official(model_dir, profile)
    ours = Embedder.from_pretrained(model_dir, profile=profile, image_resolution=resolution)
    names = list(images) if resolution is None else ["photo.jpg", "palette.png", "rgba.png", "bilevel.png"]
    items, expected = [Item(text=ROWS["text"])], [official.inputs(ROWS["text"], None)]
    for k, name in enumerate(names):
        row = ROWS["image+text"] if k % 2 else ROWS["image"]
        items.append(Item(text=row, image=images[name]))
        expected.append(official.inputs(row, official_image(images[name], resolution, profile, backbone)))
    got = ours.encode(items, batch_size=4)  # batched, padded: positions and pooling must still match
    for item, want, vector in zip(items, expected, got):
        ids, image = ours.prepare(item)
        assert ids == want["input_ids"][0].tolist(), f"token ids differ for {item.image or 'text'}"
        if image is not None:
            pixels = want["pixel_values"][0] if backbone == "llava_next" else want["pixel_values"]
            np.testing.assert_allclose(image.pixel_values, pixels.numpy(), atol=2e-6, err_msg=str(item.image))
        cosine = float(vector @ official.embed(want))
        assert cosine >= 0.99999, f"{item.image or 'text'}: cosine {cosine}"


def test_qwen_token_layout_by_profile(tiny_qwen, images):
    """Hand-checked layout: bare image pads under the VLM2Vec profiles, wrapped under native; never a BOS."""
    specials = {}
    for profile in ("vlm2vec", "vlm2vec-v2", "native"):
        emb = Embedder.from_pretrained(tiny_qwen, profile=profile)
        tok = emb.pre.tokenizer
        pad, start, end = tok.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"])
        ids, image = emb.prepare(Item(text=ROWS["image"], image=images["photo.jpg"]))
        rest = tok("\nRepresent the given image.\n")["input_ids"]
        run = [pad] * image.num_tokens
        specials[profile] = ids
        if profile == "native":
            assert ids == [start, *run, end, *rest]
        else:
            assert ids == [*run, *rest]
        text_ids, _ = emb.prepare(Item(text="a cat"))
        assert text_ids == tok("a cat")["input_ids"] and text_ids[0] not in (start, pad)
    # V2's pixel limits (3136..1003520) give this 451x300 photo more tokens than the tiny checkpoint's cap
    assert len(specials["vlm2vec-v2"]) > len(specials["vlm2vec"])


def test_llava_token_layout(tiny_llava, images):
    emb = Embedder.from_pretrained(tiny_llava)
    tok = emb.pre.tokenizer
    ids, image = emb.prepare(Item(text=ROWS["image"], image=images["photo.jpg"]))
    body = tok("\nRepresent the given image.\n", add_special_tokens=False)["input_ids"]
    assert ids == [tok.bos_token_id, *[emb.pre.image_token_id] * image.num_tokens, *body]


def test_v2_small_images_are_resized_to_56(tiny_qwen, photos):
    v1 = Embedder.from_pretrained(tiny_qwen)
    v2 = Embedder.from_pretrained(tiny_qwen, profile="vlm2vec-v2")
    item = Item(image=np.ascontiguousarray(photos["chelsea"][:20, :90]))  # 90x20: a side under 28 px
    assert v2.prepare(item)[1].meta == (1, 4, 4)  # squashed to 56x56: a 4x4 patch grid, 4 tokens
    assert v1.prepare(item)[1].meta == (1, 2, 10)  # the processor keeps the aspect: 140x28


@pytest.mark.parametrize(
    "item, v1, v2",
    [
        (Item(text="a dog"), "a dog", "a dog"),
        (Item(text="a dog", instruction="Find me: "), "Find me: a dog\n", "Find me: a dog\n"),
        (Item(text="a dog", instruction="Find me:"), "Find me: a dog\n", "Find me: a dog\n"),
        (
            Item(image=b"x", instruction="Represent the given image."),
            "<|image_1|>\nRepresent the given image.\n",
            "<|image_1|> Represent the given image.\n",
        ),
        (
            Item(image=b"x", text="What is it?", instruction="Represent the image with the question:"),
            "<|image_1|>\nRepresent the image with the question: What is it?\n",
            "<|image_1|> Represent the image with the question: What is it?\n",
        ),
        (Item(image=b"x"), "<|image_1|>\n", "<|image_1|>\n"),
        (Item(image=b"x", text=ROWS["image"]), ROWS["image"], ROWS["image"]),
    ],
)
def test_item_text_by_style(item, v1, v2):
    assert item.format_text() == v1
    assert item.format_text("v2") == v2
