"""The HTTP API's models and the OpenAPI declarations of ``POST /search`` (served at ``/openapi.json``, ``/docs``).

The handler reads the raw body itself (a streamed size check refuses an oversized body before it is parsed), so
its two request bodies are declared with FastAPI's ``openapi_extra`` from these pydantic models instead of being
parsed by FastAPI; the success model is the route's ``response_model`` and every error status is declared in its
``responses`` with ``ErrorResponse`` (401 on every route but ``/healthz``, for a server with an API token; 503 with
``Retry-After`` on ``/search``, when the model's queue is full). Each request example below is sent by the schema test.
"""

import base64
import io

from pydantic import BaseModel, Field

TEXT = "the modification text, e.g. 'make the circle red' (non-empty; at most the server's max_text_chars, 300 by default)"
TOP_K = "how many gallery images to return (1 to the server's max_top_k, 100 by default, and the gallery size)"
REFERENCE_ID = "a gallery image (GET /gallery) as the reference instead of an upload; it is left out of its own results"


class SearchJSON(BaseModel):
    """``application/json`` body: the reference as base64 ``image`` or as a gallery ``reference_id``."""

    image: str | None = Field(None, description="the reference image (PNG/JPEG/WebP...), base64 or a data: URL")
    reference_id: str | None = Field(None, description=REFERENCE_ID)
    text: str = Field(description=TEXT, min_length=1)
    top_k: int = Field(10, ge=1, description=TOP_K)


class SearchForm(BaseModel):
    """``multipart/form-data`` body: the reference as an uploaded ``image`` file or as a gallery ``reference_id``."""

    image: bytes | None = Field(None, description="the reference image file (PNG/JPEG/WebP...)")
    reference_id: str | None = Field(None, description=REFERENCE_ID)
    text: str = Field(description=TEXT, min_length=1)
    top_k: int = Field(10, ge=1, description=TOP_K)


class SearchResult(BaseModel):
    image_id: str = Field(description="a gallery image id (GET /thumbnails/{image_id} shows it)")
    score: float = Field(description="the fused similarity (higher is closer)")


class FusionWeights(BaseModel):
    gm: float = Field(description="weight of the global (GM) branch in this query's fused score")
    di: float = Field(description="weight of the detail (DI) branch")


class Degraded(BaseModel):
    missing_shards: list[int] = Field(description="index shards left out of this answer (failed or timed out)")
    shards: int = Field(description="the index's shards in all")


class SearchResponse(BaseModel):
    results: list[SearchResult] = Field(description="top_k gallery images, best first")
    weights: FusionWeights
    batch_size: int = Field(description="queries the model answered in the same forward pass (dynamic batching)")
    degraded: Degraded | None = Field(None, description="only when a sharded index answered without some shards: "
                                                          "the results are the best of the others")


class ErrorDetail(BaseModel):
    code: str = Field(description="a stable machine-readable code, e.g. bad_image, body_too_large")
    message: str = Field(description="what was wrong, naming the field and the limit (an echoed value is cut short)")


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _example_png() -> bytes:
    """A 16 x 16 red PNG: the request examples' reference image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (220, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


EXAMPLE_IMAGE = base64.b64encode(_example_png()).decode()

ERRORS = {
    400: ("the body cannot be read: malformed JSON or multipart, bad base64, an undecodable image",
          "bad_image", "image: cannot identify image file"),
    404: ("reference_id names no gallery image", "unknown_reference",
          "reference_id 'x' is not a gallery image with a thumbnail"),
    413: ("the body or the image is over the limits (max_body_mb, max_image_pixels)", "body_too_large",
          "request body exceeds the limit of 8388608 bytes"),
    415: ("neither multipart/form-data nor application/json", "unsupported_media_type",
          "content type 'text/plain': send multipart/form-data or application/json"),
    422: ("a field is missing or out of range: text, top_k, image or reference_id", "bad_top_k",
          "top_k: must be an integer from 1 to 100, got 0"),
    500: ("the server failed (logged server-side; no internals are returned)", "internal", "internal error"),
    503: ("over capacity: the model replicas' queue is full (max_queued_requests), or every shard of a sharded index "
          "is out (index_unavailable); retry after the Retry-After header's seconds", "overloaded",
          "the server is at capacity; retry after 1 s"),
}
UNAUTHORIZED = (401, "the server has an API token and the request's Authorization header is not 'Bearer <token>'",
                "unauthorized", "this server needs the header 'Authorization: Bearer <token>'")
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "the scheme: Bearer", "schema": {"type": "string"}}}


def error_responses(*errors: tuple[int, str, str, str]) -> dict:
    """FastAPI ``responses`` of (status, description, code, example message) with the error model."""
    return {status: {"model": ErrorResponse, "description": description,
                     "content": {"application/json": {"example": {"error": {"code": code, "message": message}}}},
                     **({"headers": RETRY_AFTER} if status == 503 else {}),
                     **({"headers": WWW_AUTHENTICATE} if status == 401 else {})}
            for status, description, code, message in errors}


AUTH_RESPONSES = error_responses(UNAUTHORIZED)  # every route but /healthz
SEARCH_RESPONSES = error_responses(UNAUTHORIZED, *((status, *rest) for status, rest in ERRORS.items()))

SEARCH_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": "the reference (an image, or a gallery reference_id) and the modification text",
        "content": {
            "multipart/form-data": {
                "schema": SearchForm.model_json_schema(),
                "encoding": {"image": {"contentType": "image/png, image/jpeg, image/webp, image/*"}},
                "examples": {"upload": {"summary": "an uploaded image and a text",
                                        "value": {"text": "make the circle red", "top_k": 5}}},
            },
            "application/json": {
                "schema": SearchJSON.model_json_schema(),
                "examples": {
                    "base64": {"summary": "a base64 image and a text",
                               "value": {"image": EXAMPLE_IMAGE, "text": "make the circle red", "top_k": 5}},
                    "data_url": {"summary": "a browser's data: URL",
                                 "value": {"image": f"data:image/png;base64,{EXAMPLE_IMAGE}", "text": "add a square"}},
                },
            },
        },
    }
}
