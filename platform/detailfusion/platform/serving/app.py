"""The Ray Serve retrieval app: a FastAPI ingress (``Frontend``) in front of an autoscaled, dynamically batched
model deployment (``Retriever``) that holds the exported model and its gallery index (``index_store.open_index``:
exact, in memory, or compressed, the FAISS codes in memory and the re-ranking store memory-mapped).

HTTP (all errors are ``{"error": {"code", "message"}}`` with a 4xx status, an echoed value cut short; the server
keeps serving; the models and the OpenAPI declarations are in ``schema.py``: ``/openapi.json``, ``/docs`` with the
Swagger UI assets of the installed ``fastapi-offline`` package, no CDN):
- ``POST /search``: a reference image (multipart ``image`` file, or base64 ``image`` in JSON, or a gallery
  ``reference_id``, left out of its own results) + ``text`` + ``top_k`` -> ``{"results": [{"image_id", "score"}],
  "weights": {"gm", "di"}}``; from a sharded index missing a shard, also ``"degraded": {"missing_shards", "shards"}``.
- ``GET /healthz``, ``GET /gallery?offset=&limit=``, ``GET /thumbnails/{image_id}`` (JPEG from the index),
  ``GET /`` the search page.

Shared-network guards: past the model replicas' ``max_ongoing_requests`` each, ``max_queued_requests`` more may
wait at each Frontend replica; the rest are answered at once 503 ``overloaded`` with ``Retry-After``, before their
body is read (the Frontend counts the searches it holds; Ray's queue limit on the model deployment backs it). With an API
token (``auth.py``) every route but ``/healthz`` answers 401 without ``Authorization: Bearer <token>``.

``app_builder(args)`` is the import path for ``serve run`` / ``serve deploy`` (``serve/config.yaml``).
No ``from __future__ import annotations`` here (FastAPI reads the handlers' annotations at runtime), and the
helpers come before the ingress class: ``serve.ingress`` pickles the handlers when the class is defined.
"""

import asyncio
import logging
import math
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from detailfusion.library.config import ConfigError, SearchSettings, ServeConfig, from_dict
from detailfusion.library.registry import extensions, install
from detailfusion.platform.serving.auth import OPEN_PATHS, authorized, load_token, token_digest
from detailfusion.platform.serving.queries import (
    Limits,
    RequestError,
    SearchQuery,
    check_content_length,
    parse_fields,
    parse_json,
    shown,
)
from detailfusion.platform.serving.schema import (
    AUTH_RESPONSES,
    SEARCH_REQUEST_BODY,
    SEARCH_RESPONSES,
    UNAUTHORIZED,
    SearchResponse,
)

logger = logging.getLogger("ray.serve")
# /docs and /redoc load Swagger UI and ReDoc from the package's own files (an air-gapped cluster has no CDN)
api = FastAPIOffline(title="DetailFusion composed image retrieval")
# declares the optional bearer token in the schema (the check itself is `check_token`, before any route)
BEARER = [Depends(HTTPBearer(auto_error=False, description="the server's API token, when it has one"))]
MAX_MESSAGE_CHARS = 300  # of any error message (its echoed values are already cut by `shown`)
FRONTEND_QUEUE = 1024  # requests waiting for a Frontend replica at each HTTP proxy; past it Ray's own 503
SHARD_GRACE_S = 5.0  # a shard replica's searches last milliseconds: a replica on a lost host is given up after this
NODE_SHARE = 0.001  # of a node's custom resource a pinned replica asks for (model_node, shard_nodes): many fit


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it grows past ``limit`` bytes (also without a Content-Length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def error(exc: RequestError, headers: dict | None = None) -> JSONResponse:
    body = exc.body()
    body["error"]["message"] = body["error"]["message"][:MAX_MESSAGE_CHARS]
    return JSONResponse(body, status_code=exc.status, headers=headers)


@api.middleware("http")
async def check_token(request: Request, call_next):
    """401 for every route but ``/healthz`` without the app's bearer token (when it has one: ``auth.py``)."""
    digest = serve.get_replica_context().servable_object.token_digest
    path = request.scope["path"].removeprefix(request.scope.get("root_path", "").rstrip("/"))
    if path in OPEN_PATHS or authorized(request.headers.get("authorization"), digest):
        return await call_next(request)
    return error(RequestError(401, UNAUTHORIZED[2], UNAUTHORIZED[3]), headers={"WWW-Authenticate": "Bearer"})


@api.exception_handler(HTTPException)
async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI's own refusals (an unknown route 404, a wrong method 405) in the error shape."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = f"{request.method} {shown(request.url.path)}: {exc.detail}"
    return error(RequestError(exc.status_code, codes.get(exc.status_code, "http_error"), message), exc.headers)


@api.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A query parameter of the wrong type (``/gallery?offset=x``): 422 naming the field, not echoing its value."""
    fields = "; ".join(f"{'.'.join(str(part) for part in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
    return error(RequestError(422, "bad_parameter", fields))


@serve.deployment
class IndexShard:
    """One shard of a sharded index (``sharded_index.py``, gallery rows from ``offset`` on): unified queries ->
    its best k as whole-gallery rows. Each shard is its own deployment and scales on its own."""

    def __init__(self, directory: str, fingerprint: str, offset: int, search: SearchSettings = SearchSettings(),
                 shipped: list | None = None):
        from detailfusion.library.index.store import open_index

        install(shipped)  # a fusion rule registered by the driver's user code
        self.index, self.offset = open_index(directory, fingerprint, search), offset

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 [Q, 2D] -> (scores [Q, k'], gallery rows [Q, k']), k' = min(k, shard size)."""
        queries = torch.from_numpy(np.require(queries, requirements="W"))  # Ray hands over a read-only array
        scores, rows = self.index.search(queries, min(k, len(self.index)))
        return scores.numpy(), (rows + self.offset).numpy()


class IndexUnavailable(RuntimeError):
    """Every shard of a sharded index failed or timed out: nothing to answer from."""


@serve.deployment
class Retriever:
    """Model + gallery index; ``search`` calls are batched (``@serve.batch``) into one forward pass. With ``shards``
    (handles of ``IndexShard`` deployments, in gallery order) each batch fans out to every shard in parallel and their
    top-k lists are merged (``sharded_index.merge_top_k``); a shard that fails or takes over ``shard_timeout_s`` is
    left out (the answers say so) and skipped for ``shard_retry_s``. Without shards the index is held here."""

    def __init__(self, checkpoint: str, fingerprint: str, index: str, max_batch_size: int, batch_wait_timeout_s: float,
                 use_gpu: bool, shards: list | None = None, search: SearchSettings = SearchSettings(),
                 shipped: list | None = None, shard_timeout_s: float = 2.0, shard_retry_s: float = 5.0):
        import pyarrow.parquet as pq

        from detailfusion.library.index.exact import IMAGES_FILE
        from detailfusion.library.index.store import open_index
        from detailfusion.library.model import load_model

        install(shipped)  # a compositor or fusion rule registered by the driver's user code
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model, self.tokenizer = load_model(checkpoint)
        self.model = model.to(self.device).eval()
        self.shards = shards or []
        self.shard_timeout_s, self.shard_retry_s = shard_timeout_s, shard_retry_s
        self.shard_out_until = [0.0] * len(self.shards)  # time.monotonic() before which a failed shard is skipped
        if self.shards:  # the shards hold the index; here only its ids (build_app checked the fingerprint)
            self.index = None
            self.image_ids = pq.read_table(Path(index) / IMAGES_FILE, columns=["image_id"]).column(0).to_pylist()
        else:
            self.index = open_index(index, fingerprint, search)  # refuses another model's index
            self.image_ids = self.index.image_ids
        self.static_weights = list(model.config.static_weights)
        self.search_batch.set_max_batch_size(max_batch_size)
        self.search_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def search(self, query: dict) -> dict:
        return await self.search_batch(query)

    @serve.batch(max_batch_size=ServeConfig.max_batch_size, batch_wait_timeout_s=ServeConfig.batch_wait_timeout_s)
    async def search_batch(self, queries: list[dict]) -> list[dict]:
        """queries: {pixels uint8 [S, S, 3], text, top_k, exclude (an image id left out, or None)} each ->
        {results, weights, batch_size}."""
        from detailfusion.library.model.inference import embed_queries

        pixels = torch.from_numpy(np.stack([q["pixels"] for q in queries])).to(self.device)
        features = embed_queries(self.model, self.tokenizer, pixels, [q["text"] for q in queries])
        k = min(len(self.image_ids), max(q["top_k"] + (q.get("exclude") is not None) for q in queries))
        scores, rows, missing = await self._search(features["unified"], k)
        degraded = {"missing_shards": missing, "shards": len(self.shards)} if missing else None
        out = []
        for q, score_row, index_row, weights in zip(queries, scores.tolist(), rows.tolist(), features["weights"].tolist()):
            if any(w != w for w in weights):  # NaN: a compositor without per-query weights (static)
                weights = self.static_weights
            ranked = [(s, self.image_ids[i]) for s, i in zip(score_row, index_row)]
            results = [{"image_id": image_id, "score": round(s, 6)}
                       for s, image_id in ranked if image_id != q.get("exclude")][:q["top_k"]]
            out.append({"results": results, "weights": {"gm": weights[0], "di": weights[1]},
                        "batch_size": len(queries), **({"degraded": degraded} if degraded else {})})
        return out

    async def _search(self, unified: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """unified [Q, 2D] -> (scores [Q, k], gallery rows [Q, k], shards left out)."""
        if not self.shards:
            return *self.index.search(unified, k), []
        from detailfusion.library.index.sharded import merge_top_k

        queries = unified.detach().float().cpu().numpy()
        parts = await asyncio.gather(*(self._ask_shard(number, queries, k) for number in range(len(self.shards))))
        missing = [number for number, part in enumerate(parts) if part is None]
        if len(missing) == len(parts):
            raise IndexUnavailable(f"all {len(parts)} index shards failed or timed out")
        # copies: Ray's arrays are read-only
        return (*merge_top_k([(torch.tensor(s), torch.tensor(r)) for s, r in filter(None, parts)], k), missing)

    async def _ask_shard(self, number: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Shard ``number``'s (scores, rows), or None when it is out (failed, timed out, or skipped after that)."""
        if time.monotonic() < self.shard_out_until[number]:
            return None
        response = self.shards[number].search.remote(queries, k)
        try:
            return await asyncio.wait_for(asyncio.ensure_future(response), self.shard_timeout_s)
        except Exception as exc:  # noqa: BLE001  (a dead replica, a lost host, a timeout: the shard is out a while)
            response.cancel()
            self.shard_out_until[number] = time.monotonic() + self.shard_retry_s
            logger.warning("index shard %d left out for %.0f s: %s", number, self.shard_retry_s,
                           f"no answer in {self.shard_timeout_s} s" if isinstance(exc, TimeoutError) else repr(exc))
            return None


@serve.deployment
@serve.ingress(api)
class Frontend:
    """HTTP: parses and checks requests, answers errors, serves the page and thumbnails; forwards searches."""

    def __init__(self, retriever, index: str, image_size: int, limits: dict, token_digest: bytes | None = None,
                 admit: int | None = None, retry_after_s: float = 1.0):
        from detailfusion.library.index.exact import IMAGES_FILE, Thumbnails

        self.retriever = retriever
        self.token_digest = token_digest  # SHA-256 of the API token (None: open), read by `check_token`
        # searches this replica holds at most (the model replicas' room + their queue; None: no limit): past it a
        # search is answered 503 before its body is read, so an overload costs the parsing nothing
        self.admit, self.searching, self.retry_after_s = admit, 0, retry_after_s
        self.limits = Limits(**limits)
        self.image_size = image_size  # the model's input side (px): requests and thumbnails are resized to it
        self.thumbnails = Thumbnails(Path(index) / IMAGES_FILE)  # read on demand, a row group at a time
        self.image_ids = self.thumbnails.image_ids
        self.page = resources.files("detailfusion.platform.serving").joinpath("static/index.html").read_text()

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "gallery": len(self.image_ids), "image_size": self.image_size}

    @api.get("/", response_class=HTMLResponse, responses=AUTH_RESPONSES, dependencies=BEARER)
    def page(self) -> str:
        return self.page

    @api.get("/gallery", responses=AUTH_RESPONSES, dependencies=BEARER)
    def gallery(self, offset: int = 0, limit: int = 24) -> dict:
        limit = max(0, min(limit, 200))
        return {"total": len(self.image_ids), "images": self.image_ids[max(0, offset):max(0, offset) + limit]}

    @api.get("/thumbnails/{image_id}", responses=AUTH_RESPONSES, dependencies=BEARER)
    def thumbnail(self, image_id: str) -> Response:
        data = self.thumbnails.get(image_id)
        if data is None:
            return error(RequestError(404, "unknown_image", f"no thumbnail for image {shown(image_id)}"))
        return Response(content=data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @api.post("/search", response_model=SearchResponse, responses=SEARCH_RESPONSES, openapi_extra=SEARCH_REQUEST_BODY,
              dependencies=BEARER, summary="Search the gallery with a reference image and a modification text")
    async def search(self, request: Request) -> Response:
        """Returns the ``top_k`` gallery images closest to the composed query, best first, and the query's branch
        weights. The body is read and size-checked as it streams in (413 past ``max_body_mb``); 503 at once when the
        model replicas' queue is full."""
        if self.admit is not None and self.searching >= self.admit:  # shed before the body is read: cheap
            return self._overloaded()
        self.searching += 1
        try:
            query = await self._query(request)
            pixels = query.pixels if query.pixels is not None else self._reference_pixels(query.reference_id)
            # a gallery reference is left out of its own results, as the CIRR protocol removes it
            result = await self.retriever.search.remote({"pixels": pixels, "text": query.text, "top_k": query.top_k,
                                                         "exclude": query.reference_id})
            return JSONResponse(result)
        except RequestError as exc:
            return error(exc)
        except BackPressureError:  # the model deployment's queue is full (other Frontend replicas share it)
            return self._overloaded()
        except IndexUnavailable as exc:
            return error(RequestError(503, "index_unavailable", str(exc)),
                         headers={"Retry-After": str(max(1, math.ceil(self.retry_after_s)))})
        except Exception:  # noqa: BLE001  (logged server-side; the client gets no internals)
            logger.exception("search failed")
            return error(RequestError(500, "internal", "internal error"))
        finally:
            self.searching -= 1

    def _overloaded(self) -> JSONResponse:
        wait = max(1, math.ceil(self.retry_after_s))
        return error(RequestError(503, "overloaded", f"the server is at capacity; retry after {wait} s"),
                     headers={"Retry-After": str(wait)})

    async def _query(self, request: Request) -> SearchQuery:
        check_content_length(request.headers.get("content-length"), self.limits)
        body = await read_body(request, self.limits.max_body_bytes)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            return parse_json(body, self.image_size, len(self.image_ids), self.limits)
        if kind == "multipart/form-data":
            from starlette.formparsers import MultiPartException, MultiPartParser

            async def stream():
                yield body

            try:
                form = await MultiPartParser(request.headers, stream()).parse()
            except MultiPartException as exc:
                raise RequestError(400, "bad_multipart", f"malformed multipart body: {exc.message}") from None
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            upload = form.get("image")
            image = await upload.read() if upload is not None and not isinstance(upload, str) else None
            return parse_fields(fields, image, self.image_size, len(self.image_ids), self.limits)
        raise RequestError(415, "unsupported_media_type",
                           f"content type {shown(kind) if kind else 'none'}: send multipart/form-data or application/json")

    def _reference_pixels(self, image_id: str) -> np.ndarray:
        from detailfusion.library.data.images import load_pixels

        data = self.thumbnails.get(image_id)
        if data is None:
            raise RequestError(404, "unknown_reference",
                               f"reference_id {shown(image_id)} is not a gallery image with a thumbnail")
        return load_pixels(data, self.image_size)  # the thumbnail through the same transform as an upload


def build_app(config: ServeConfig):
    """The Serve application of ``config`` (checkpoint + index; batching, autoscaling and limits). The driver reads
    the checkpoint's identity and image size once; each model replica loads its weights."""
    from detailfusion.library.index.exact import IndexMismatch
    from detailfusion.library.index.store import index_meta
    from detailfusion.library.model import model_fingerprint
    from detailfusion.library.model.inference import image_size

    if not (Path(config.checkpoint) / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {config.checkpoint!r}: config.json not found (give an exported model "
                                "directory)")
    meta = index_meta(config.index)
    fingerprint = model_fingerprint(config.checkpoint)
    if meta["model_fingerprint"] != fingerprint:  # refused here, before any replica starts
        raise IndexMismatch(f"index {config.index} was built by model {meta['model_fingerprint']}, not by "
                            f"{config.checkpoint}; rebuild it with `detailfusion index` and this checkpoint")
    if meta.get("backend") in (None, "exact") and config.search.given():  # a sharded index: each shard checks
        raise ConfigError(f"search settings {config.search.given()} apply to a compressed (ivfpq) index; "
                          f"{config.index} is exact")
    if config.shard_nodes and not meta.get("shards"):
        raise ConfigError(f"shard_nodes {list(config.shard_nodes)} place the shards of a sharded index; "
                          f"{config.index} is in one piece (build it with index_backend.shards)")
    on_model_node = {"resources": {config.model_node: NODE_SHARE}} if config.model_node else {}
    batch = config.max_batch_size if config.batching else 1
    token = token_digest(load_token(config.api_token_file))  # read here, once: the replicas get its digest only
    shipped = extensions()
    shards = _shard_deployments(config, meta, fingerprint, shipped)
    shed = BackpressureConfig(status_code=503, retry_after_s=config.retry_after_s)
    ongoing = config.max_ongoing_requests or max(2 * batch, 2)
    admit = None if config.max_queued_requests == -1 else ongoing * config.max_replicas + config.max_queued_requests
    retriever = Retriever.options(
        max_ongoing_requests=ongoing,
        max_queued_requests=config.max_queued_requests, backpressure_config=shed,
        **({"max_replicas_per_node": config.max_replicas_per_node} if config.max_replicas_per_node else {}),
        autoscaling_config={"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                            "target_ongoing_requests": config.target_ongoing_requests or batch,
                            "upscale_delay_s": config.upscale_delay_s, "downscale_delay_s": config.downscale_delay_s,
                            "look_back_period_s": config.look_back_period_s},
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": 1 if config.use_gpu else 0, **on_model_node},
    ).bind(config.checkpoint, fingerprint, config.index, batch, config.batch_wait_timeout_s, config.use_gpu, shards,
           config.search, shipped, config.shard_timeout_s, config.shard_retry_s)
    limits = {"max_body_bytes": int(config.max_body_mb * 1024 * 1024), "max_image_pixels": config.max_image_pixels,
              "max_text_chars": config.max_text_chars, "max_top_k": config.max_top_k}
    return Frontend.options(ray_actor_options={"num_cpus": config.frontend_cpus, **on_model_node},
                            max_ongoing_requests=256,
                            max_queued_requests=FRONTEND_QUEUE, backpressure_config=shed).bind(
        retriever, config.index, image_size(config.checkpoint), limits, token, admit, config.retry_after_s)


def _shard_deployments(config: ServeConfig, meta: dict, fingerprint: str, shipped: list) -> list:
    """One bound ``IndexShard`` deployment per shard of a sharded index (``meta``: its index.json; none for an index
    in one piece), each autoscaled like the model deployment, between ``min_replicas`` and ``max_replicas`` replicas of
    ``shard_cpus``, on the nodes offering its ``shard_nodes`` resource when given."""
    from detailfusion.library.index.sharded import SHARDED

    if meta.get("backend") != SHARDED:
        return []
    return [IndexShard.options(
        name=f"IndexShard{number}", max_ongoing_requests=8, graceful_shutdown_timeout_s=SHARD_GRACE_S,
        autoscaling_config={"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                            "target_ongoing_requests": 2,
                            "upscale_delay_s": config.upscale_delay_s, "downscale_delay_s": config.downscale_delay_s},
        ray_actor_options={"num_cpus": config.shard_cpus,
                           **({"resources": {config.shard_nodes[number % len(config.shard_nodes)]: NODE_SHARE}}
                              if config.shard_nodes else {})},
    ).bind(str(Path(config.index) / name), fingerprint, offset, config.search, shipped) for number, (name, offset) in
        enumerate(zip(meta["shards"], meta["offsets"]))]


def app_builder(args: dict):
    """``serve run detailfusion.platform.serving.app:app_builder checkpoint=... index=...`` (args are ServeConfig keys).
    Built on the cluster (Ray is up): its node resources are checked here as ``detailfusion serve`` checks them."""
    config = from_dict(ServeConfig, dict(args), source="serve application args")
    check_placement(config)
    return build_app(config)


def check_placement(config: ServeConfig) -> None:
    """Refuse node resources (``model_node``, ``shard_nodes``) that no node of the running Ray offers: their replicas
    would wait for a node for ever."""
    import ray

    offered = ray.cluster_resources()
    wanted = {f"shard_nodes[{i}]": name for i, name in enumerate(config.shard_nodes)}
    if config.model_node:
        wanted["model_node"] = config.model_node
    missing = {key: name for key, name in wanted.items() if name not in offered}
    if missing:
        custom = sorted(r for r in offered if r not in ("CPU", "GPU", "memory", "object_store_memory")
                        and not r.startswith("node:") and not r.startswith("accelerator_type:"))
        raise ConfigError(f"serve: no node offers {', '.join(f'{k}={v!r}' for k, v in missing.items())} "
                          f"(custom node resources here: {', '.join(custom) or 'none'}; give them with "
                          "`ray start --resources` or cluster.yaml's resources:)")
