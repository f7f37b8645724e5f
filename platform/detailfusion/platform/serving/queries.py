"""One search request -> a checked ``SearchQuery``, or a ``RequestError`` (HTTP status, code, message).

Accepted bodies of ``POST /search``:
- ``multipart/form-data``: ``image`` (file) or ``reference_id``, ``text``, optional ``top_k``;
- ``application/json``: ``{"image": base64, "text": ..., "top_k": ...}`` or ``{"reference_id": ...}`` instead of
  ``image`` (a gallery image as the reference).

Messages name the field and the limit, never a file-system path; an echoed value is cut to a short prefix
(``shown``).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

import numpy as np

from detailfusion.library.data.images import BadImage, decode_image, model_pixels
from detailfusion.library.errors import RequestError  # re-exported: callers import it from here

SHOWN_CHARS = 40  # of an echoed value in an error message


def shown(value) -> str:
    """``repr(value)``, or its first ``SHOWN_CHARS`` characters and the length when longer (a client's input,
    echoed in an error, stays short whatever its size)."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= SHOWN_CHARS:
        return repr(value)
    return f"{text[:SHOWN_CHARS]!r}... ({len(text)} characters)"


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 * 1024 * 1024  # the whole request body
    max_image_pixels: int = 40_000_000  # width x height, read from the header before decoding
    max_text_chars: int = 300
    max_top_k: int = 100


@dataclass
class SearchQuery:
    """pixels: uint8 [S, S, 3] at the model's resolution, or None with ``reference_id`` set."""

    text: str
    top_k: int
    pixels: np.ndarray | None = None
    reference_id: str | None = None


def check_content_length(header: str | None, limits: Limits) -> None:
    if header is not None and header.isdigit() and int(header) > limits.max_body_bytes:
        size = header if len(header) <= SHOWN_CHARS else shown(header)
        raise RequestError(413, "body_too_large", f"request body of {size} bytes exceeds the limit of "
                                                  f"{limits.max_body_bytes} bytes")


def image_pixels(data: bytes, size: int, limits: Limits) -> np.ndarray:
    """Image bytes -> uint8 [size, size, 3] (the training transform), or RequestError 400 / 413."""
    try:
        image = decode_image(data, max_pixels=limits.max_image_pixels)
    except BadImage as exc:
        reason = str(exc)
        if "decompression bomb" in reason or "absurd size" in reason:
            raise RequestError(413, "image_too_large", f"image: {reason}") from None
        raise RequestError(400, "bad_image", f"image: {reason}") from None
    return model_pixels(image, size)


def parse_fields(fields: dict, image: bytes | None, size: int, gallery_size: int, limits: Limits) -> SearchQuery:
    """Checked query from the parsed fields (``image``: the raw bytes, already taken out of ``fields``)."""
    text = fields.get("text")
    if not isinstance(text, str) or not text.strip():
        raise RequestError(422, "bad_text", "text: give the modification text (a non-empty string)")
    if len(text) > limits.max_text_chars:
        raise RequestError(422, "bad_text", f"text: {len(text)} characters exceeds the limit of {limits.max_text_chars}")
    top_k = fields.get("top_k", 10)
    if isinstance(top_k, str) and top_k.strip().lstrip("-").isdigit() and len(top_k) <= 12:  # int() of 4,300+
        top_k = int(top_k)  # digits raises; a longer number is out of range anyway
    highest = min(limits.max_top_k, gallery_size)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= highest:
        raise RequestError(422, "bad_top_k", f"top_k: must be an integer from 1 to {highest}, got {shown(top_k)}")
    reference_id = fields.get("reference_id")
    if image is not None and reference_id:
        raise RequestError(422, "ambiguous_reference", "give either image or reference_id, not both")
    if image is not None:
        return SearchQuery(text.strip(), top_k, pixels=image_pixels(image, size, limits))
    if isinstance(reference_id, str) and reference_id:
        return SearchQuery(text.strip(), top_k, reference_id=reference_id)
    raise RequestError(422, "missing_image", "image: upload the reference image (or give a gallery reference_id)")


def parse_json(body: bytes, size: int, gallery_size: int, limits: Limits) -> SearchQuery:
    try:
        fields = json.loads(body)
    except ValueError as exc:  # undecodable bytes, bad JSON, a number past int()'s 4,300 digits
        raise RequestError(400, "bad_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise RequestError(400, "bad_json", "body must be a JSON object with image (base64), text and top_k")
    image = fields.pop("image", None)
    if image is not None:
        if not isinstance(image, str):
            raise RequestError(400, "bad_base64", "image: expected a base64 string")
        if image.startswith("data:") and "," in image:  # a data URL from a browser
            image = image.split(",", 1)[1]
        try:
            image = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "bad_base64", "image: not valid base64") from None
    return parse_fields(fields, image, size, gallery_size, limits)
