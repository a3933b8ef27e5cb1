"""The service's request bodies: parsed and checked before any work is queued, every error a
`BadRequest` naming the field and the value seen (the service answers 400 with it).

Queries: {"text": ["a caption", …]} or {"image": [IMAGE, …]} (or {"item": id}: a gallery
item's stored vector as the query), with optional "k", "rerank_top" and "where". An IMAGE is
the image tower's input: {"region_feat": [[…] × n], "boxes": [[x1, y1, x2, y2, w, h, area] ×
n]} for a region tower, {"picture": "<base64 of a PNG / JPEG file>"} for a ViT.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from typing import Any

import numpy as np

from ldot_jax.data import batching, images as image_files
from ldot_jax.models import towers
from ldot_jax.retrieval import filters


class BadRequest(ValueError):
    """A request the service refuses (HTTP 400), naming the field."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask: queries (the batcher's max_batch), k, characters per
    caption, items per update."""

    max_queries: int = 32
    max_k: int = 1000
    max_chars: int = 1000
    max_items: int = 256


def body_of(raw: bytes) -> dict:
    """The JSON object of a request body."""
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"body: not JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"body: expected a JSON object, got {type(body).__name__}")
    return body


def _int(body: dict, key: str, default, low: int, high: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise BadRequest(f"{key}={value}: expected {low} ≤ {key} ≤ {high}")
    return value


def texts(body: dict, limits: Limits, key: str = "text") -> list[str]:
    value = body[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise BadRequest(f"{key}: expected a non-empty list of captions, got {value!r:.80}")
    if len(value) > limits.max_queries:
        raise BadRequest(f"{key}: {len(value)} queries, at most {limits.max_queries} per "
                         f"request")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise BadRequest(f"{key}[{i}]: expected a string, got {type(text).__name__}")
        if not text.strip():
            raise BadRequest(f"{key}[{i}]: empty caption")
        if len(text) > limits.max_chars:
            raise BadRequest(f"{key}[{i}]: {len(text)} characters, at most "
                             f"{limits.max_chars}")
    return value


def image_of(value: Any, model_config, where: str) -> dict:
    """One per-image input of the model's image tower from its JSON form."""
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: expected an object, got {type(value).__name__}")
    if towers.image_input_name(model_config) == "pixels":
        picture = value.get("picture")
        if not isinstance(picture, str):
            raise BadRequest(f"{where}.picture: expected the base64 text of a PNG or JPEG "
                             f"file (this model reads pictures), got keys {sorted(value)}")
        try:
            data = base64.b64decode(picture, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{where}.picture: not base64") from None
        try:
            return {"pixels": image_files.load_pixels(data, model_config.pixels.image_size)}
        except image_files.BadImageError as e:
            raise BadRequest(f"{where}.picture: {e}") from None
    region = model_config.region
    out = {}
    for key, width in (("region_feat", region.feat_dim), ("boxes", region.box_dim)):
        if key not in value:
            raise BadRequest(f"{where}.{key}: missing (this model reads regions: "
                             f"\"region_feat\" and \"boxes\"), got keys {sorted(value)}")
        try:
            array = np.asarray(value.get(key), np.float32)
        except (TypeError, ValueError):
            raise BadRequest(f"{where}.{key}: expected a list of number lists") from None
        if array.ndim != 2 or array.shape[1] != width or not len(array):
            raise BadRequest(f"{where}.{key}: shape {list(array.shape)}, expected [n ≥ 1, "
                             f"{width}] (this model's {key} width)")
        if not np.isfinite(array).all():
            raise BadRequest(f"{where}.{key}: non-finite values")
        out[key] = array
    if len(out["region_feat"]) != len(out["boxes"]):
        raise BadRequest(f"{where}: {len(out['region_feat'])} regions but "
                         f"{len(out['boxes'])} boxes")
    try:
        batching.check_boxes(out["boxes"], f"{where}.boxes")
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return out


def image_list(body: dict, limits: Limits, model_config, key: str = "image") -> list[dict]:
    value = body[key]
    if not isinstance(value, list) or not value:
        raise BadRequest(f"{key}: expected a non-empty list of images")
    if len(value) > limits.max_queries:
        raise BadRequest(f"{key}: {len(value)} queries, at most {limits.max_queries} per "
                         f"request")
    return [image_of(v, model_config, f"{key}[{i}]") for i, v in enumerate(value)]


@dataclasses.dataclass(frozen=True)
class SearchRequest:
    """One parsed /search body: the direction, its queries (captions, per-image inputs, or
    none with `item`), k, rerank_top, where."""

    direction: str
    queries: list
    k: int
    rerank_top: int | None
    where: dict | None
    item: int | None = None


KNOWN_SEARCH = {"text", "image", "item", "k", "rerank_top", "where"}


def search_request(body: dict, limits: Limits, model_config) -> SearchRequest:
    unknown = sorted(set(body) - KNOWN_SEARCH)
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown field (expected some of "
                         f"{sorted(KNOWN_SEARCH)})")
    given = [key for key in ("text", "image", "item") if key in body]
    if len(given) != 1:
        raise BadRequest(f"expected one of \"text\", \"image\" or \"item\", got "
                         f"{given or 'none'}")
    k = _int(body, "k", 10, 1, limits.max_k)
    rerank_top = _int(body, "rerank_top", None, 0, limits.max_k)
    where = body.get("where")
    if where is not None and (not isinstance(where, dict) or not where):
        raise BadRequest(f"where: expected a non-empty object of field → value(s), got "
                         f"{where!r:.80}")
    if given[0] == "text":
        return SearchRequest("text_to_image", texts(body, limits), k, rerank_top, where)
    if given[0] == "image":
        return SearchRequest("image_to_text", image_list(body, limits, model_config), k,
                             rerank_top, where)
    item = body["item"]
    if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < 2 ** 63:
        raise BadRequest(f"item: expected an item id (an integer ≥ 0), got {item!r:.80}")
    return SearchRequest("image_to_text", [], k, rerank_top, where, item)


def embed_request(body: dict, limits: Limits, model_config) -> tuple[str, list]:
    given = [key for key in ("text", "image") if key in body]
    if len(given) != 1 or set(body) - {"text", "image"}:
        raise BadRequest(f"expected exactly one of \"text\" or \"image\", got {sorted(body)}")
    if given[0] == "text":
        return "text", texts(body, limits)
    return "image", image_list(body, limits, model_config)


@dataclasses.dataclass(frozen=True)
class NewItems:
    images: list
    keys: list
    names: list
    fields: list


def items_request(body: dict, limits: Limits, model_config) -> NewItems:
    items = body.get("items")
    if not isinstance(items, list) or not items:
        raise BadRequest("items: expected a non-empty list of {\"key\", \"image\", \"name\"?, "
                         "\"fields\"?}")
    if len(items) > limits.max_items:
        raise BadRequest(f"items: {len(items)} items, at most {limits.max_items} per request")
    out = NewItems([], [], [], [])
    for i, item in enumerate(items):
        where = f"items[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where}: expected an object")
        key = item.get("key")
        if not isinstance(key, str) or not key:
            raise BadRequest(f"{where}.key: expected a non-empty string, got {key!r:.80}")
        name = item.get("name", key)
        if not isinstance(name, str):
            raise BadRequest(f"{where}.name: expected a string")
        fields = item.get("fields", {})
        if not isinstance(fields, dict):
            raise BadRequest(f"{where}.fields: expected an object")
        for field, value in fields.items():
            try:
                filters.check_value(value, f"{where}.fields.{field}")
            except ValueError as e:
                raise BadRequest(str(e)) from None
        out.images.append(image_of(item.get("image"), model_config, f"{where}.image"))
        out.keys.append(key)
        out.names.append(name)
        out.fields.append(fields)
    return out


def delete_request(body: dict) -> tuple[list[int] | None, list[str] | None]:
    ids, keys = body.get("ids"), body.get("keys")
    if (ids is None) == (keys is None) or set(body) - {"ids", "keys"}:
        raise BadRequest(f"expected exactly one of \"ids\" or \"keys\", got {sorted(body)}")
    values = ids if ids is not None else keys
    kind = int if ids is not None else str
    if not isinstance(values, list) or not values or not all(
            isinstance(v, kind) and not isinstance(v, bool)
            and (kind is str or 0 <= v < 2 ** 63) for v in values):
        raise BadRequest(f"{'ids' if ids is not None else 'keys'}: expected a non-empty list "
                         f"of {'integers' if ids is not None else 'strings'}")
    return (ids, None) if ids is not None else (None, keys)
