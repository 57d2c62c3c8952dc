"""Request and response bodies of the OpenAI-compatible API (pydantic), plus the multimodal extensions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ItemInput(BaseModel):
    """One multimodal item in `input`: text, an image (a data URI, or an http(s) URL where the server
    allows fetching), and the MMEB task instruction; at least one of text and image."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    image: str | None = Field(default=None, description="data:image/...;base64,... (or an http(s) URL)")
    instruction: str | None = None


class ImageURL(BaseModel):
    url: str
    detail: str | None = None  # accepted for compatibility; the backbone's own image settings apply


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    """A chat message: system messages give the instruction, user messages the text and the image."""

    role: Literal["system", "user"]
    content: str | list[ContentPart]


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings. Exactly one of `input` and `messages`.

    input: a string, a list of strings, an item object or a list mixing strings and item objects; token
    ids are refused (this server tokenises itself, with the model's own tokenizer and image tokens).
    messages: one chat-style item (text and image_url parts), one embedding.
    instruction: the default instruction of items that carry none (a vlm2vec-rt extension).
    dimensions: keep the first `dimensions` components and re-normalise (Matryoshka-style).
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: Any = Field(
        default=None,
        description="a string, a list of strings, or items {text, image, instruction} (alone or in a list)",
    )
    messages: list[Message] | None = None
    instruction: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, strict=True)
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlm2vec-rt"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
