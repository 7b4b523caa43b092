"""The ASGI app: thin routes over the engine, which lives on ``app.state.engine``."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import orjson
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response, StreamingResponse

from jv4_vllm._version import __version__
from jv4_vllm.config import Config
from jv4_vllm.core.fleet import PEER_PATH, Fleet
from jv4_vllm.core.image_rules import model_image_limits
from jv4_vllm.router.admission import (
    CLIENT_CLOSED_REQUEST,
    AdmissionMiddleware,
    until_disconnect,
)
from jv4_vllm.router.auth import ApiKeys
from jv4_vllm.router.byte_budget import ByteBudget
from jv4_vllm.router.drain import AFTER_DRAIN_S, Drain, DrainingServer, DrainMiddleware
from jv4_vllm.router.errors import install_error_handler
from jv4_vllm.router.kept_pdfs import KeptPdfs
from jv4_vllm.router.metrics import MetricsMiddleware, RouterMetrics
from jv4_vllm.router.process import freeze_startup_objects, tune_process
from jv4_vllm.router.protocol import (
    EmbeddingsRequest,
    EmbeddingsResponse,
    ModelCard,
    ModelList,
    RerankRequest,
    RerankResponse,
    error_responses,
)
from jv4_vllm.router.rendering import render_chunks
from jv4_vllm.router.request_ids import RequestIdMiddleware
from jv4_vllm.router.serving import (
    decode_gate,
    embed_items,
    large_response,
    request_items,
    rerank,
)

if TYPE_CHECKING:
    from jv4_vllm.core.engine import Engine

__all__ = ["create_app", "run"]

log = logging.getLogger(__name__)

ERROR_RESPONSES = error_responses()
RERANK_RESPONSES = error_responses(
    s400="Invalid request: the message and param name the field, query or documents[i]",
    s413="Too many documents or PDF pages, or a document over the size limits")

routes = APIRouter()


def _json(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, headers=headers, media_type="application/json")


@routes.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=ERROR_RESPONSES,
             summary="Embed texts and images")
async def create_embeddings(body: EmbeddingsRequest, request: Request) -> Response:
    """OpenAI-compatible embeddings with the Jina API's task, multi-vector and output options."""
    state = request.app.state
    engine: Engine = state.engine

    async def work() -> bytes | Iterator[bytes]:
        options = body.options(engine.model_name, engine.tasks)
        request.state.task = options.task
        items = await request_items(body, state.config.limits, state.decode_gate, state.kept_pdfs,
                                    KeptPdfs.caller(request.headers.get("authorization")))
        result = await embed_items(engine, items, options)
        state.metrics.observe_embed(options.task, items, result.prompt_tokens)
        chunks = render_chunks(result, model=body.model or engine.model_name, embedding_type=body.output_type(),
                               output=options.output, pages=items.pages)
        return chunks if large_response(result) else b"".join(chunks)

    finished, content = await until_disconnect(request, work())
    if not finished:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if isinstance(content, bytes):
        return Response(content, media_type="application/json")
    return StreamingResponse(content, media_type="application/json")  # sync chunks: iterated in worker threads


@routes.post("/v1/rerank", response_model=RerankResponse, responses=RERANK_RESPONSES,
             summary="Rerank documents (texts, images, PDF pages) against a query")
@routes.post("/rerank", response_model=RerankResponse, responses=RERANK_RESPONSES, include_in_schema=False)
async def create_rerank(body: RerankRequest, request: Request) -> Response:
    """jina-embeddings-v4's own scores of every document against the query, best first: MaxSim
    (default) over the task's multi-vectors, or cosine of single vectors (``scoring: dense``).
    A PDF ranks as its best page; the query gets the query role, documents the passage role."""
    state = request.app.state

    async def work() -> bytes:
        def on_task(task: str) -> None:
            request.state.task = task

        content, items, tokens = await rerank(body, state.engine, state.config.limits, state.decode_gate, on_task)
        state.metrics.observe_embed(request.state.task, items, tokens)
        return content

    finished, content = await until_disconnect(request, work())
    if not finished:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return Response(content, media_type="application/json")


@routes.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, summary="List served models")
async def list_models(request: Request) -> Response:
    """The model name, and one name per task adapter (``<model>-<task>``) usable as ``model``."""
    engine: Engine = request.app.state.engine
    names = [engine.model_name] + [f"{engine.model_name}-{task}" for task in engine.tasks]
    return _json(ModelList(data=[ModelCard(id=name) for name in names]).model_dump())


@routes.get("/health", summary="Liveness")
async def health() -> Response:
    """The process is up (it says nothing about the backends; see /ready)."""
    return _json({"status": "ok"})


@routes.get("/ready", summary="Readiness", responses={503: {"description": "No task has a healthy backend"}})
async def ready(request: Request, all: bool = False) -> Response:
    """200 while at least one task has a healthy backend, so healthy tasks keep serving when
    another task's deployment is down; the body gives each task's state. 503 when none has
    (with ``?all=true``: unless every task has one, for start-up scripts)."""
    if request.app.state.drain.draining:
        return _json({"status": "shutting_down", "message": "this router is draining its requests before it exits"},
                     status_code=503, headers={"Retry-After": "1"})
    tasks = request.app.state.engine.readiness()
    states = {task: "ready" if ok else "unavailable" for task, ok in tasks.items()}
    down = [task for task, ok in tasks.items() if not ok]
    if len(down) == len(tasks) or (all and down):
        return _json({"status": "unavailable", "tasks": states, "message": f"no healthy backend for {down}"},
                     status_code=503, headers={"Retry-After": "1"})
    body: dict[str, Any] = {"status": "ready" if not down else "degraded", "tasks": states}
    if down:
        body["message"] = f"no healthy backend for {down}; their requests get 503"
    return _json(body)


@routes.get(PEER_PATH, summary="Fleet membership", include_in_schema=False)
async def peer(request: Request, id: str = "") -> Response:
    """Peer routers check each other here: 200 with this router's id, or 409 when ``id`` is this
    router's own (it found itself in ``router.peers`` and must not count itself twice)."""
    own = request.app.state.fleet.id
    return _json({"id": own}, status_code=409 if id == own else 200)


@routes.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)


def create_app(config: Config, engine: Engine | None = None) -> FastAPI:
    """The router app. Without ``engine`` it starts one from ``config`` (and closes it) in its lifespan."""
    keys = ApiKeys.from_config(config.router)
    fleet = Fleet(config.router.peers, config.backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            yield
            return
        from jv4_vllm.core.engine import Engine

        await fleet.start()
        try:
            app.state.engine = await Engine.start(config, fleet)
            freeze_startup_objects()
            try:
                yield
            finally:
                await app.state.engine.aclose()
        finally:
            await fleet.aclose()

    app = FastAPI(title="jv4_vllm router", version=__version__, lifespan=lifespan,
                  description="jina-embeddings-v4 on vLLM: OpenAI- and Jina-compatible embeddings, "
                              "every task adapter, text and images, single and multi-vector.")
    app.state.config = config.model_copy(update={"limits": model_image_limits(config)})  # pixels follow the model
    app.state.engine = engine
    app.state.fleet = fleet
    app.state.metrics = RouterMetrics(lambda: app.state.engine, fleet.size)
    app.state.decode_gate = decode_gate(app.state.config.limits)  # the input pools
    app.state.drain = Drain(config.router.shutdown_grace_s)
    app.state.kept_pdfs = KeptPdfs(config.limits.max_kept_pdf_bytes)
    install_error_handler(app)
    app.include_router(routes)
    paths = frozenset(route.path for route in app.routes if hasattr(route, "path"))
    app.state.byte_budget = ByteBudget(config.limits.max_bytes_in_flight)
    app.add_middleware(AdmissionMiddleware, keys=keys, max_body_bytes=config.limits.max_request_bytes,
                       budget=app.state.byte_budget)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, routes=paths)
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    app.add_middleware(RequestIdMiddleware)
    if not keys.enabled and not _loopback(config.router.host):
        log.warning("SECURITY: the router listens on %s with no API keys: anyone who can reach port %d can use "
                    "the model. Set %s (or router.api_keys_file), or listen on 127.0.0.1.",
                    config.router.host, config.router.port, config.router.api_keys_env)
    return app


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(config: Config) -> None:
    """Serve the router with uvicorn (uvloop, httptools) until a signal, then drain (:mod:`.drain`)."""
    level = config.router.log_level.lower()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level.upper())
    tune_process()
    app = create_app(config)
    server_config = uvicorn.Config(app, host=config.router.host, port=config.router.port, loop="uvloop",
                                   http="httptools", log_level=level, timeout_graceful_shutdown=AFTER_DRAIN_S)
    DrainingServer(server_config, app.state.drain).run()
