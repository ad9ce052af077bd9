"""The HTTP app and its Ray Serve deployment.

Routes: ``POST /recommend`` (the contract in :mod:`llmrec_dist.serving.requests`), ``GET /healthz``
(200 once a model is loaded, else 503; the last registry-poll error either way) and ``GET /version``.
Every error is one line of JSON, ``{"error": "..."}``: 4xx for a bad request, 404/405 for an unknown
route or method, 500 for anything unexpected, and the replica keeps serving.

Inside a replica:

- **Dynamic batching.** Requests that arrive together (up to ``serve.max_batch_size``, waiting at most
  ``serve.batch_wait_timeout_s``) are answered by one model call, run in a worker thread so the
  event loop keeps taking requests.
- **Alias following, blue/green inside the replica.** With ``models:/NAME@ALIAS`` a background thread asks
  the registry every ``serve.poll_seconds`` where the alias points. A new version is loaded completely
  beside the serving one, then swapped in by one reference assignment: a batch takes the model
  reference once when it starts, so requests in flight finish on the old model and none is dropped. A
  registry error is kept (shown by /healthz) and the loaded model keeps serving.

This module must not use ``from __future__ import annotations``: FastAPI resolves the ``Request``
annotation of the route methods at import time. Serve pickles the deployment class by value, so the
methods import what they use from other modules inside their bodies.
"""

import logging
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("llmrec_dist.serving")

IMPORT_PATH = "llmrec_dist.serving.app:build"
DRAIN_LIMIT_BYTES = 64 * 2**20  # an over-limit body is read and dropped up to this size
app = FastAPI(title="llmrec_dist recommender", docs_url=None, redoc_url=None, openapi_url=None)


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split()) or "error"}, status_code=status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"no route {request.url.path}; routes: POST /recommend, GET /healthz, GET /version"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    return error_response(exc.status_code, message)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 when it exceeds ``max_bytes``. Beyond the limit the body is
    read on and dropped (up to ``DRAIN_LIMIT_BYTES``) rather than held: a client still sending when the
    answer comes would get a broken pipe instead of the 413."""
    from llmrec_dist.serving.app import DRAIN_LIMIT_BYTES
    from llmrec_dist.serving.requests import RequestError

    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= max_bytes:
            chunks.append(chunk)
        elif size > DRAIN_LIMIT_BYTES:
            break
    if size > max_bytes:
        raise RequestError(413, f"request body of {'more than ' if size > DRAIN_LIMIT_BYTES else ''}{size} bytes "
                                f"exceeds the limit of {max_bytes} bytes")
    return b"".join(chunks)


def answer_batch(loaded, requests: list) -> list[dict]:
    """One response body per request, all from ``loaded`` (a :class:`~llmrec_dist.serving.source.Loaded`).

    Requests with the same diversity and explain share one ``recommend`` call; ``exclude`` goes per
    history. Options the model does not take are never passed (requests using them were refused).
    ``k`` beyond the catalogue is capped at the catalogue size.
    """
    import warnings

    rec, options = loaded.servable, loaded.options
    model = {"name": loaded.name, "version": loaded.version}
    groups: dict[tuple, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault((request.diversity, request.explain), []).append(i)
    out: list = [None] * len(requests)
    for (diversity, explain), members in groups.items():
        kwargs = {}
        if options.get("exclude") and any(requests[i].exclude for i in members):
            kwargs["exclude"] = [list(requests[i].exclude) for i in members]
        if options.get("diversity") and diversity:
            kwargs["diversity"] = diversity
        if options.get("explain") and explain:
            kwargs["explain"] = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown history ids are skipped, by contract
            results = rec.recommend([requests[i].history for i in members],
                                    [min(requests[i].k, rec.num_items) for i in members], **kwargs)
        for i, result in zip(members, results):
            because = result.get("because") if explain else None
            items = []
            for pos, (item_id, score) in enumerate(zip(result["item_ids"], result["scores"])):
                item = {"item_id": str(item_id), "score": float(score)}
                if explain:
                    item["because"] = [str(v) for v in because[pos]] if because else []
                items.append(item)
            out[i] = {"items": items, "model": model}
    return out


@serve.deployment(name="Recommender")
@serve.ingress(app)
class RecommenderServer:
    """One replica: the loaded model, the registry poller, and the routes."""

    def __init__(self, config: dict):
        from llmrec_dist.serving.settings import serve_config_from_dict
        from llmrec_dist.serving.source import ModelSource

        self._cfg = serve_config_from_dict({"serve": config})
        self._source = ModelSource(self._cfg.model, self._cfg.tracking_uri, self._cfg.trust_remote_code,
                                   self._cfg.diversity_space, self._cfg.text_encoder)
        self._answer.set_max_batch_size(self._cfg.max_batch_size)
        self._answer.set_batch_wait_timeout_s(self._cfg.batch_wait_timeout_s)
        self._poll = {"last_error": None, "last_error_at": None, "last_checked_at": None}
        self._stats = {"requests": 0, "batches": 0, "largest_batch": 0}  # this replica's, since it started
        # Loaded before the constructor returns: Serve routes no request to a replica until then.
        self._current = self._source.load()
        self._stop = threading.Event()
        if self._source.follows_alias:
            threading.Thread(target=self._follow_alias, name="llmrec-alias-poller", daemon=True).start()

    # ------------------------------------------------------------------------- alias following
    def _follow_alias(self) -> None:
        while not self._stop.wait(self._cfg.poll_seconds):
            self.poll_once()

    def poll_once(self) -> bool:
        """Ask the registry where the alias points; load and swap in a new version. True if swapped."""
        try:
            version = self._source.current_version()
            self._poll["last_checked_at"] = time.time()
            if version == self._current.version:
                return False
            loaded = self._source.load(version)  # the old model serves meanwhile
            old = self._current.version
            self._current = loaded  # the swap: one reference assignment
            log.info("alias %s moved: now serving version %s (was %s)", self._source.alias, version, old)
            return True
        except Exception as err:  # kept and shown; the loaded model keeps serving
            self._poll["last_error"] = f"{type(err).__name__}: {' '.join(str(err).split())}"
            self._poll["last_error_at"] = time.time()
            log.warning("registry poll failed: %s", self._poll["last_error"])
            return False

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    # ---------------------------------------------------------------------------------- routes
    @app.post("/recommend")
    async def recommend(self, request: Request):
        from llmrec_dist.serving.app import error_response, read_body
        from llmrec_dist.serving.requests import RequestError, check_supported, decode_body, parse_recommend

        cfg = self._cfg
        try:
            body = decode_body(await read_body(request, cfg.max_body_bytes), cfg.max_body_bytes)
            parsed = parse_recommend(body, cfg)
            check_supported(parsed, self._current.options)
        except RequestError as err:
            return error_response(err.status, err.message)
        try:
            return await self._answer(parsed)
        except Exception as err:  # a model error on one batch: 500 for it, the replica goes on
            log.exception("recommend failed")
            return error_response(500, f"internal error: {type(err).__name__}: {err}")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _answer(self, requests: list) -> list:
        import asyncio

        from llmrec_dist.serving.app import answer_batch

        loaded = self._current  # taken once: a swap during this batch does not affect it
        stats = self._stats
        stats["requests"] += len(requests)
        stats["batches"] += 1
        stats["largest_batch"] = max(stats["largest_batch"], len(requests))
        return await asyncio.to_thread(answer_batch, loaded, requests)

    @app.get("/healthz")
    async def healthz(self):
        from fastapi.responses import JSONResponse

        loaded = getattr(self, "_current", None)
        body = {"status": "ok" if loaded is not None else "loading",
                "model": {"name": loaded.name, "version": loaded.version} if loaded is not None else None,
                "registry_poll": dict(self._poll), "batching": dict(self._stats)}
        return JSONResponse(body, status_code=200 if loaded is not None else 503)

    @app.get("/version")
    async def version(self):
        from fastapi.responses import JSONResponse

        from llmrec_dist.serving.app import error_response

        loaded = getattr(self, "_current", None)
        if loaded is None:
            return error_response(503, "no model loaded yet")
        return JSONResponse({"name": loaded.name, "version": loaded.version, "uri": self._source.uri,
                             "alias": self._source.alias or None, "follows_alias": self._source.follows_alias,
                             "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(loaded.loaded_at)),
                             "options": loaded.options, "max_k": self._cfg.max_k,
                             "diversity_space": loaded.servable.diversity_space,
                             "num_items": loaded.servable.num_items})


def logging_config(cfg) -> dict:
    """Serve's logging settings (proxy and replicas) for ``serve.access_log``."""
    return {"enable_access_log": bool(cfg.access_log)}


def deployment_options(cfg) -> dict:
    """Ray Serve options of the deployment from a :class:`~llmrec_dist.serving.settings.ServeConfig`."""
    options = {"ray_actor_options": {"num_cpus": cfg.cpus_per_replica},
               "max_ongoing_requests": cfg.max_ongoing_requests, "logging_config": logging_config(cfg)}
    if cfg.autoscaling:
        options["autoscaling_config"] = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                         "target_ongoing_requests": cfg.target_ongoing_requests}
    else:
        options["num_replicas"] = cfg.num_replicas
    return options


def application(cfg):
    """The bound Serve application for a checked config (tracking URI and folder paths resolved)."""
    from llmrec_dist.serving.source import ModelSource
    from llmrec_dist.tracking import resolve_tracking_uri

    values = cfg.to_dict()
    values["tracking_uri"] = resolve_tracking_uri(cfg.tracking_uri)
    source = ModelSource(cfg.model, values["tracking_uri"])
    if source.kind == "folder":
        values["model"] = source.uri  # absolute: replicas run in other directories
    return RecommenderServer.options(**deployment_options(cfg)).bind(values)


def build(args: dict):
    """Application builder for ``serve deploy`` / ``serve run``: ``args`` is the ``serve:`` section
    (``import_path: llmrec_dist.serving.app:build``; `llmrec-dist serve --write-config` writes such a file)."""
    from llmrec_dist.serving.settings import serve_config_from_dict

    return application(serve_config_from_dict({"serve": dict(args or {})}, "application args"))

