"""From a request body to prepared items: parsing, limits, data URIs, optional URL fetching, preparation.

Everything here that is cheap (parsing fields, checking sizes from lengths) runs on the event loop and
fails fast with an APIError naming the field; what costs CPU (base64 and image decoding, tiling,
tokenising) runs in `prepare_items`, on the batcher's preparation threads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

import pydantic

from ..errors import InputError
from ..models.preprocessors import Prepared
from ..preprocess.items import Item
from .config import ServeConfig
from .errors import APIError
from .schemas import EmbeddingRequest, ImagePart, ItemInput, TextPart

# a data URI's media type must be image/*, this, or empty (RFC 2397's default): the bytes themselves decide
_OCTET_STREAM = "application/octet-stream"


@dataclass
class RawItem:
    """One item of a request before preparation; `where` names it in errors ("input[2]", "messages")."""

    where: str
    text: str | None = None
    instruction: str | None = None
    image_field: str | None = None  # the field that held the image, e.g. "input[2].image"
    image_data: str | None = None  # base64 payload of a data URI
    image_url: str | None = None  # a remote URL, fetched before preparation
    image_bytes: bytes | None = None  # a fetched remote image

    @property
    def has_image(self) -> bool:
        return self.image_data is not None or self.image_url is not None or self.image_bytes is not None


def _field_path(loc: tuple[Any, ...]) -> str:
    """pydantic's error location -> the request's field, "messages[0].content[1].image_url".

    Union branches show up in locations as type names ("str", "list[...]", "ImageURL") and a tagged
    union's tag repeats the field ("image_url", "image_url"): neither is a field of the request.
    """
    out = ""
    last: Any = None
    for part in loc:
        if isinstance(part, str) and (
            part in ("str", "int", "list", "dict") or "[" in part or part[:1].isupper()
        ):
            continue
        if isinstance(part, str) and part == last:
            continue
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
        last = part
    return out


def validation_error(e: pydantic.ValidationError, prefix: str = "") -> APIError:
    """The most specific problem pydantic found (the deepest field), as a 400 naming its field."""
    err = max(e.errors(), key=lambda x: len(_field_path(x["loc"])))
    param = _field_path(err["loc"])
    if prefix:
        param = f"{prefix}.{param}" if param else prefix
    if err["type"] == "extra_forbidden":
        return APIError(400, f"unknown field {param!r}", param=param, code="unknown_field")
    if err["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err['msg']}", code="invalid_json")
    if err["type"] in ("model_type", "model_attributes_type") and not param:
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    return APIError(400, f"{param or 'body'}: {err['msg']}", param=param or None, code="invalid_value")


def parse_request(body: bytes) -> EmbeddingRequest:
    """The request body as an EmbeddingRequest; APIError 400 naming the field otherwise."""
    if not body.strip():
        raise APIError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        return EmbeddingRequest.model_validate_json(body)
    except pydantic.ValidationError as e:
        raise validation_error(e) from None


# ---- items ---------------------------------------------------------------------------------------------
def request_items(req: EmbeddingRequest, cfg: ServeConfig) -> list[RawItem]:
    """The request's items, checked against the limits; APIError naming the field otherwise."""
    if (req.input is None) == (req.messages is None):
        raise APIError(400, "give exactly one of 'input' and 'messages'", param="input", code="invalid_value")
    items = _from_messages(req, cfg) if req.messages is not None else _from_input(req, cfg)
    if len(items) > cfg.max_request_items:
        raise APIError(
            413,
            f"input has {len(items)} items, over this server's limit of {cfg.max_request_items} per request",
            param="input",
            code="too_many_items",
        )
    return items


def _token_ids_error(param: str) -> APIError:
    return APIError(
        400,
        f"{param}: token-id input is not supported; send the text itself (this server tokenises with the "
        "model's own tokenizer, image tokens included)",
        param=param,
        code="token_ids_not_supported",
    )


def _from_input(req: EmbeddingRequest, cfg: ServeConfig) -> list[RawItem]:
    value = req.input
    if isinstance(value, (str, dict)):
        return [_one_input(value, "input", req, cfg)]
    if not isinstance(value, list):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise _token_ids_error("input")
        raise APIError(
            400, "input must be a string, a list of strings or items", param="input", code="invalid_value"
        )
    if not value:
        raise APIError(400, "input is an empty list", param="input", code="invalid_value")
    if len(value) > cfg.max_request_items:  # before looking at each one
        raise APIError(
            413,
            f"input has {len(value)} items, over this server's limit of {cfg.max_request_items} per request",
            param="input",
            code="too_many_items",
        )
    return [_one_input(v, f"input[{i}]", req, cfg) for i, v in enumerate(value)]


def _one_input(value: Any, where: str, req: EmbeddingRequest, cfg: ServeConfig) -> RawItem:
    if isinstance(value, str):
        if not value.strip():
            raise APIError(400, f"{where} is an empty string", param=where, code="invalid_value")
        return RawItem(where, text=value, instruction=req.instruction)
    if isinstance(value, dict):
        try:
            item = ItemInput.model_validate(value)
        except pydantic.ValidationError as e:
            raise validation_error(e, where) from None
        raw = RawItem(where, text=item.text, instruction=item.instruction or req.instruction)
        if item.image is not None:
            _set_image(raw, item.image, f"{where}.image", cfg)
        if not raw.has_image and not (item.text or "").strip():
            raise APIError(400, f"{where} has neither text nor image", param=where, code="invalid_value")
        return raw
    if isinstance(value, (int, list)) and not isinstance(value, bool):
        raise _token_ids_error(where)
    raise APIError(
        400,
        f"{where} must be a string or an item object, got {type(value).__name__}",
        param=where,
        code="invalid_value",
    )


def _from_messages(req: EmbeddingRequest, cfg: ServeConfig) -> list[RawItem]:
    """One item from chat messages: system text -> instruction, user text parts -> text (joined by new
    lines), one image_url part -> the image."""
    assert req.messages is not None
    if not req.messages:
        raise APIError(400, "messages is an empty list", param="messages", code="invalid_value")
    raw = RawItem("messages")
    instructions: list[str] = []
    texts: list[str] = []
    for i, message in enumerate(req.messages):
        parts = (
            [TextPart(type="text", text=message.content)]
            if isinstance(message.content, str)
            else message.content
        )
        for j, part in enumerate(parts):
            where = f"messages[{i}].content" + ("" if isinstance(message.content, str) else f"[{j}]")
            if isinstance(part, TextPart):
                (instructions if message.role == "system" else texts).append(part.text)
                continue
            assert isinstance(part, ImagePart)
            if message.role == "system":
                raise APIError(
                    400, f"{where}: a system message cannot hold an image", param=where, code="invalid_value"
                )
            if raw.has_image:
                raise APIError(
                    400,
                    f"{where}: one image per item (this one has a second); send several items in 'input' "
                    "to embed several images",
                    param=where,
                    code="too_many_images",
                )
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            field = f"{where}.image_url" + ("" if isinstance(part.image_url, str) else ".url")
            _set_image(raw, url, field, cfg)
    raw.text = "\n".join(t for t in texts if t) or None
    raw.instruction = " ".join(t for t in instructions if t) or req.instruction
    if not raw.has_image and not (raw.text or "").strip():
        raise APIError(400, "messages hold neither text nor an image", param="messages", code="invalid_value")
    return [raw]


def _set_image(raw: RawItem, value: str, field: str, cfg: ServeConfig) -> None:
    """Record a data URI's payload (size checked from its length, decoded later) or a remote URL."""
    raw.image_field = field
    if value.startswith("data:"):
        header, comma, payload = value[5:].partition(",")
        params = [p.strip().lower() for p in header.split(";")]
        if not comma or "base64" not in params[1:]:
            raise APIError(
                400,
                f"{field}: a data URI must be base64-encoded (data:image/png;base64,...)",
                param=field,
                code="invalid_image",
            )
        mime = params[0]
        if mime and not mime.startswith("image/") and mime != _OCTET_STREAM:
            raise APIError(
                400, f"{field}: media type {mime!r} is not an image", param=field, code="invalid_image"
            )
        size = len(payload) * 3 // 4  # base64's decoded size, to within padding
        if size > cfg.max_image_bytes:
            raise APIError(
                413,
                f"{field}: the image has about {size} bytes, over this server's limit of {cfg.max_image_bytes}",
                param=field,
                code="image_too_large",
            )
        raw.image_data = payload
        return
    if re.match(r"https?://", value, re.IGNORECASE):
        if not cfg.allow_url_fetch:
            raise APIError(
                400,
                f"{field}: remote image URLs are not fetched by this server (start it with --allow-url-fetch); "
                "send the image inline as a data URI (data:image/png;base64,...)",
                param=field,
                code="url_fetch_disabled",
            )
        raw.image_url = value
        return
    raise APIError(
        400,
        f"{field}: expected a data URI (data:image/png;base64,...) or an http(s) URL",
        param=field,
        code="invalid_image",
    )


# ---- remote images -------------------------------------------------------------------------------------
async def fetch_remote_images(items: list[RawItem], client: Any, cfg: ServeConfig) -> None:
    """Fetch every remote image of a request at once (httpx.AsyncClient), each within the timeout and the
    size cap; APIError naming the field otherwise."""
    remote = [raw for raw in items if raw.image_url is not None]
    if remote:
        await asyncio.gather(*(_fetch(raw, client, cfg) for raw in remote))


async def _fetch(raw: RawItem, client: Any, cfg: ServeConfig) -> None:
    import httpx

    url, field = raw.image_url, raw.image_field
    cap = cfg.max_image_bytes

    async def get() -> bytes:
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise APIError(
                    400,
                    f"{field}: fetching {url} gave HTTP {response.status_code}",
                    param=field,
                    code="fetch_failed",
                )
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > cap:
                raise _too_large(field, url, cap)
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > cap:  # a server may send more than it declared, or declare nothing
                    raise _too_large(field, url, cap)
            return bytes(data)

    try:
        # one deadline for the whole fetch: httpx's own timeouts are per read, and a slow drip resets them
        raw.image_bytes = await asyncio.wait_for(get(), cfg.url_fetch_timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise APIError(
            400,
            f"{field}: fetching {url} took over {cfg.url_fetch_timeout:g} s",
            param=field,
            code="fetch_timeout",
        ) from None
    except httpx.HTTPError as e:
        raise APIError(400, f"{field}: cannot fetch {url}: {e}", param=field, code="fetch_failed") from None
    raw.image_url = None


def _too_large(field: str | None, url: str | None, cap: int) -> APIError:
    return APIError(
        413,
        f"{field}: {url} is over this server's image limit of {cap} bytes",
        param=field,
        code="image_too_large",
    )


# ---- preparation (a worker thread) ---------------------------------------------------------------------
_ITEM_PREFIX = re.compile(r"^item (\d+): ")


def prepare_items(pre: Any, items: list[RawItem]) -> list[Prepared]:
    """Decode, tile and tokenise a request's items (on a preparation thread) -> (token ids, image) each.
    An InputError names the request's field ("input[2]: image bytes ... not a readable image")."""
    built: list[Item] = []
    for raw in items:
        image: bytes | None = raw.image_bytes
        if raw.image_data is not None:
            image = _b64decode(raw.image_data, raw.image_field)
        try:
            built.append(Item(text=raw.text, image=image, instruction=raw.instruction))
        except InputError as e:
            raise InputError(f"{raw.where}: {e}") from None
    try:
        return pre.prepare_many(built)
    except InputError as e:
        # the library names the item by its index in the list it was given: name the request's field
        msg = str(e)
        m = _ITEM_PREFIX.match(msg)
        if m and int(m.group(1)) < len(items):
            raise InputError(f"{items[int(m.group(1))].where}: {msg[m.end() :]}") from None
        raise


def _b64decode(payload: str, field: str | None) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # some encoders wrap base64 in lines (MIME's 76 columns): whitespace is no error
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{field}: the data URI's payload is not valid base64") from None


def error_param(message: str) -> str | None:
    """The request field an InputError's message starts with ("input[2].image: ..." -> "input[2].image")."""
    m = re.match(r"^((?:input|messages)(?:\[\d+\])?(?:\.[\w\[\]\.]+)?): ", message)
    return m.group(1) if m else None
