"""Bad requests to the router: each gets the right 4xx and names the field or input, and the router lives on.

The router runs on a real uvicorn server over the real Engine, started on the prepared demo
checkpoint with NO vLLM behind it: every row below must be refused before any backend call
(a request that got through would come back 503 instead of its 4xx).
"""

from __future__ import annotations

import asyncio
import base64
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from images_util import make_image, png_bytes
from jv4_vllm.config import Config
from jv4_vllm.core.engine import Engine
from jv4_vllm.router import create_app
from jv4_vllm.router.rendering import render_embeddings
from jv4_vllm.core.types import EmbedResult, OutputKind
from jv4_vllm.errors import Jv4Error, OverloadedError
from jv4_vllm.router.protocol import EmbeddingsRequest
from test_images import png_header_only
from jv4_vllm.deploy.launch import wait_until_up
from vllm_stack import InProcessServer, free_port, write_config

pytestmark = pytest.mark.timeout(300)

TASKS = ("retrieval", "text-matching", "code")
API_KEY = "sk-test-0123456789abcdef"
MAX_MODEL_LEN = 512
MAX_INPUTS = 8
MAX_BODY = 512 * 1024
MAX_IMAGE = 64 * 1024


def make_config(prepared_dir: Path, url: str | None = None, *, limits: dict[str, Any] | None = None,
                router: dict[str, Any] | None = None, backend: dict[str, Any] | None = None) -> Config:
    """Deployments at ``url`` (default: a loopback port nobody listens on)."""
    url = url or f"http://127.0.0.1:{free_port()}"
    return Config.model_validate({
        "prepared_dir": str(prepared_dir),
        "router": {"host": "127.0.0.1", "port": free_port(), "api_keys_env": "JV4_TEST_UNSET_KEYS", **(router or {})},
        "deployments": {task: {"urls": [url]} for task in TASKS},
        "vllm": {"max_model_len": MAX_MODEL_LEN},
        "limits": {"max_inputs_per_request": MAX_INPUTS, "max_request_bytes": MAX_BODY, "max_image_bytes": MAX_IMAGE,
                   **(limits or {})},
        "backend": backend or {},
    })


@pytest.fixture(scope="module")
async def engine(prepared_dir: Path) -> AsyncIterator[Engine]:
    started = await Engine.start(make_config(prepared_dir))
    assert not any(started.readiness().values()), "no backend may be reachable for this module"
    yield started
    await started.aclose()


@pytest.fixture(scope="module")
async def servers(engine: Engine, prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> AsyncIterator[dict[str, str]]:
    """Three routers over the same engine: default limits, image URLs on, and API keys on."""
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# router keys\n{API_KEY}\n\n")
    configs = {
        "default": make_config(prepared_dir),
        "urls": make_config(prepared_dir, limits={"allow_image_urls": True, "image_url_timeout_s": 2.0}),
        "keys": make_config(prepared_dir, router={"api_keys_file": str(keys_file)}),
    }
    running = {name: InProcessServer(create_app(cfg, engine), cfg.router.port) for name, cfg in configs.items()}
    for server in running.values():
        await server.__aenter__()
    yield {name: server.url for name, server in running.items()}
    for server in running.values():
        await server.__aexit__(None, None, None)


# --- the table ------------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BIG_IMAGE = png_bytes(make_image(256, 256))
assert MAX_IMAGE < len(BIG_IMAGE) and len(b64(BIG_IMAGE)) < MAX_BODY
GOOD_IMAGE = b64(png_bytes(make_image(32, 32)))
LONG_TEXT = "word " * (MAX_MODEL_LEN + 100)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Row:
    id: str
    status: int
    param: str | None
    match: str
    body: Any = None  # sent as JSON
    raw: bytes | None = None  # sent as is, instead of body
    headers: dict[str, str] = field(default_factory=dict)
    server: str = "default"
    method: str = "POST"
    code: str | None = None


ROWS = [
    # framing
    Row("malformed-json", 400, None, "not valid JSON", raw=b'{"input": "a",', code="invalid_json"),
    Row("not-utf8", 400, None, "not valid JSON", raw=b"\xff\xfe{}"),
    Row("empty-body", 400, None, "request body is required", raw=b""),
    Row("body-is-array", 400, None, "must be a JSON object", body=["hello"]),
    Row("body-is-string", 400, None, "must be a JSON object", body="hello"),
    Row("deeply-nested", 400, None, "error parsing the body", raw=b"[" * 100_000 + b"]" * 100_000),
    Row("unknown-field", 400, "chunk_size", "unknown field", body={"input": "a", "chunk_size": 512}),
    Row("get-method", 405, None, "Method Not Allowed", method="GET"),
    # input
    Row("missing-input", 400, "input", "input is required", body={"model": "jina-embeddings-v4"}),
    Row("input-number", 400, "input", "must be a string or a non-empty list", body={"input": 42}),
    Row("input-null", 400, "input", "must be a string", body={"input": None}),
    Row("input-empty-list", 400, "input", "at least 1 item", body={"input": []}),
    Row("input-empty-string", 400, "input[0]", "empty string", body={"input": ""}),
    Row("input-blank-in-list", 400, "input[2]", r"input\[2\] is an empty string", body={"input": ["a", "b", "  \n"]}),
    Row("input-empty-text-object", 400, "input[1]", "empty string", body={"input": ["a", {"text": ""}]}),
    Row("input-number-item", 400, "input[1]", "must be a string", body={"input": ["a", 7]}),
    Row("input-token-ids", 400, "input[0]", "must be a string", body={"input": [[101, 102]]}),
    Row("input-text-not-string", 400, "input[0].text", "valid string", body={"input": [{"text": 5}]}),
    Row("input-text-and-image", 400, "input[0]", "must be a string", body={"input": [{"text": "a", "image": "b"}]}),
    Row("input-empty-object", 400, "input[0]", "must be a string", body={"input": [{}]}),
    Row("input-object-extra-key", 400, "input[0].lang", "unknown field", body={"input": [{"text": "a", "lang": "en"}]}),
    Row("input-lone-surrogate", 400, "input[0]", "not valid Unicode", raw=b'{"input": "\\ud800"}'),
    Row("too-many-inputs", 413, "input", f"limit is {MAX_INPUTS}", body={"input": ["a"] * (MAX_INPUTS + 1)},
        code="too_many_inputs"),
    Row("too-long-no-truncate", 400, "input[1]", r"input\[1\] has more than the maximum of \d+ tokens", body={"input": ["ok", LONG_TEXT]},
        code="input_too_long"),
    # model and task
    Row("unknown-model", 404, "model", "not served here", body={"input": "a", "model": "text-embedding-3-small"},
        code="model_not_found"),
    Row("model-not-string", 400, "model", "valid string", body={"input": "a", "model": 4}),
    Row("unknown-task", 400, "task", "unknown task", body={"input": "a", "task": "classification"}),
    Row("unknown-role", 400, "task", "unknown role", body={"input": "a", "task": "retrieval.document"}),
    Row("task-contradicts-model", 400, "task", "contradicts model",
        body={"input": "a", "model": "jina-embeddings-v4-code", "task": "retrieval.query"}),
    # dimensions and outputs
    Row("dimensions-not-matryoshka", 400, "dimensions", "not supported", body={"input": "a", "dimensions": 100}),
    Row("dimensions-zero", 400, "dimensions", "greater than 0", body={"input": "a", "dimensions": 0}),
    Row("dimensions-string", 400, "dimensions", "valid integer", body={"input": "a", "dimensions": "64"}),
    Row("dimensions-float", 400, "dimensions", "valid integer", body={"input": "a", "dimensions": 64.5}),
    Row("dimensions-huge", 400, "dimensions", "not supported", body={"input": "a", "dimensions": 10**30}),
    Row("multivector-with-dimensions", 400, "dimensions", "cannot be combined",
        body={"input": "a", "dimensions": 16, "return_multivector": True}),
    Row("multivector-not-bool", 400, "return_multivector", "valid boolean",
        body={"input": "a", "return_multivector": "yes"}),
    Row("truncate-not-bool", 400, "truncate", "valid boolean", body={"input": "a", "truncate": "no"}),
    Row("bad-encoding-format", 400, "encoding_format", "'float' or 'base64'",
        body={"input": "a", "encoding_format": "int8"}),
    Row("bad-embedding-type", 400, "embedding_type", "'ubinary'", body={"input": "a", "embedding_type": "int8"}),
    Row("bad-encoding-type", 400, "encoding_type", "'ubinary'", body={"input": "a", "encoding_type": "int8"}),
    Row("conflicting-output-types", 400, "embedding_type", "contradicts",
        body={"input": "a", "embedding_type": "binary", "encoding_format": "base64"}),
    Row("user-not-string", 400, "user", "valid string", body={"input": "a", "user": 12}),
    Row("return-dense-not-bool", 400, "return_dense", "valid boolean",
        body={"input": "a", "return_multivector": True, "return_dense": "yes"}),
    Row("return-dense-bad-dimensions", 400, "dimensions", "not supported",
        body={"input": "a", "return_multivector": True, "return_dense": True, "dimensions": 100}),
    # late chunking
    Row("pool-factor-zero", 400, "multivector_pool_factor", "greater than or equal to 1",
        body={"input": "a", "return_multivector": True, "multivector_pool_factor": 0}),
    Row("pool-factor-without-multivector", 400, "multivector_pool_factor", "with return_multivector",
        body={"input": "a", "multivector_pool_factor": 2}),
    Row("pool-factor-with-dimensions", 400, "multivector_pool_factor", "cannot be combined with dimensions",
        body={"input": "a", "return_multivector": True, "multivector_pool_factor": 2, "dimensions": 128}),
    Row("late-chunking-not-bool", 400, "late_chunking", "valid boolean", body={"input": "a", "late_chunking": 1}),
    Row("late-chunking-image", 400, "input[1]", "late chunking takes texts only",
        body={"input": ["a", {"image": GOOD_IMAGE}], "late_chunking": True}),
    Row("late-chunking-blank-input", 400, "input[1]", "empty string",
        body={"input": ["a", " ", "b"], "late_chunking": True}),
    Row("late-chunking-cut-away", 400, "input[1]", r"input\[1\] has no tokens left",
        body={"input": [LONG_TEXT, "the tail"], "late_chunking": True, "truncate": True}),
    # images
    Row("image-broken-base64", 400, "input[1]", "not valid base64",
        body={"input": ["a", {"image": "iVBORw0KGgo***"}]}, code="invalid_base64"),
    Row("image-not-an-image", 400, "input[0]", "not an image", body={"input": [{"image": b64(b"just some text")}]},
        code="invalid_image"),
    Row("image-truncated", 400, "input[0]", "broken or truncated",
        body={"input": [{"image": b64(png_bytes(make_image(64, 64))[:300])}]}),
    Row("image-data-uri-not-base64", 400, "input[0]", "data URI", body={"input": [{"image": "data:image/png,abc"}]}),
    Row("image-giant-pixel-count", 413, "input[2]", "pixels",
        body={"input": ["a", "b", {"image": b64(png_header_only(100_000, 100_000))}]}),
    Row("image-over-byte-limit", 413, "input[0]", f"larger than {MAX_IMAGE} bytes",
        body={"input": [{"image": b64(BIG_IMAGE)}]}),
    Row("image-not-string", 400, "input[0].image", "valid string", body={"input": [{"image": [1, 2]}]}),
    Row("image-url-when-disabled", 400, "input[0]", "URLs are disabled",
        body={"input": [{"image": "https://example.com/cat.png"}]}, code="forbidden_url"),
    Row("image-url-loopback", 400, "input[1]", "forbidden", server="urls",
        body={"input": [{"image": GOOD_IMAGE}, {"image": f"http://127.0.0.1:{free_port()}/cat.png"}]},
        code="forbidden_url"),
    Row("image-url-localhost", 400, "input[0]", "forbidden", server="urls",
        body={"input": [{"image": "http://localhost/cat.png"}]}),
    Row("image-url-ipv6-loopback", 400, "input[0]", "forbidden", server="urls",
        body={"input": [{"image": "http://[::1]:8080/cat.png"}]}),
    Row("image-url-unspecified", 400, "input[0]", "forbidden", server="urls",
        body={"input": [{"image": "http://0.0.0.0/cat.png"}]}),
    Row("image-url-file-scheme", 400, "input[0]", "must be http", server="urls",
        body={"input": [{"image": "file:///etc/passwd"}]}),
    # size
    Row("oversized-body", 413, None, f"larger than {MAX_BODY} bytes", body={"input": "x" * (MAX_BODY + 1)},
        code="payload_too_large"),
    # API keys
    Row("missing-api-key", 401, None, "missing API key", body={"input": "a"}, server="keys", code="invalid_api_key"),
    Row("wrong-api-key", 401, None, "invalid API key", body={"input": "a"}, server="keys",
        headers={"Authorization": "Bearer sk-wrong"}),
    Row("key-without-bearer", 401, None, "missing API key", body={"input": "a"}, server="keys",
        headers={"Authorization": API_KEY}),
    Row("basic-auth-scheme", 401, None, "missing API key", body={"input": "a"}, server="keys",
        headers={"Authorization": "Basic dXNlcjpwYXNz"}),
    Row("bad-key-checked-before-body", 401, None, "invalid API key", raw=b"{not json", server="keys",
        headers={"Authorization": "Bearer nope"}),
    Row("good-key-still-validates", 400, "dimensions", "not supported", server="keys", headers=AUTH,
        body={"input": "a", "dimensions": 3}),
    Row("models-needs-key", 401, None, "missing API key", server="keys", method="GET"),
]


async def send(client: httpx.AsyncClient, base: str, row: Row) -> httpx.Response:
    path = "/v1/models" if row.id == "models-needs-key" else "/v1/embeddings"
    if row.method == "GET":
        return await client.get(f"{base}{path}", headers=row.headers)
    if row.raw is not None:
        return await client.post(f"{base}{path}", content=row.raw,
                                 headers={"Content-Type": "application/json", **row.headers})
    return await client.post(f"{base}{path}", json=row.body, headers=row.headers)


def test_the_table_covers_every_request_field_and_client_error() -> None:
    """A new request field or a new 4xx class needs its bad-request rows here."""
    fields_named = {re.split(r"[\[.]", row.param)[0] for row in ROWS if row.param}
    assert set(EmbeddingsRequest.model_fields) - fields_named == set()
    client_errors = {cls.status for cls in _error_classes(Jv4Error)
                     if 400 <= cls.status < 500 and cls is not OverloadedError}  # load, not input: test_overload
    assert client_errors - {row.status for row in ROWS} == set()
    assert len({row.id for row in ROWS}) == len(ROWS)


def _error_classes(root: type) -> list[type]:
    return [root] + [c for sub in root.__subclasses__() for c in _error_classes(sub)]


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
async def test_bad_request(row: Row, servers: dict[str, str]) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await send(client, servers[row.server], row)
    assert response.status_code == row.status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    assert error["param"] == row.param
    assert re.search(row.match, error["message"]), error["message"]
    if row.code is not None:
        assert error["code"] == row.code
    if row.param is not None and row.param.startswith("input["):
        assert row.param.split(".")[0] in error["message"]  # the message names the input too
    assert "retry-after" not in response.headers
    assert API_KEY not in response.text


async def test_router_is_healthy_after_the_table(servers: dict[str, str]) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        for base in servers.values():
            assert (await client.get(f"{base}/health")).status_code == 200
        # A valid request passes every check and only then finds no backend: 503 with Retry-After.
        good = {"input": ["hello", {"image": GOOD_IMAGE}], "task": "retrieval.passage", "dimensions": 16}
        response = await client.post(f"{servers['default']}/v1/embeddings", json=good)
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "no_healthy_backend"
        response = await client.post(f"{servers['keys']}/v1/embeddings", json=good, headers=AUTH)
        assert response.status_code == 503
        ready = await client.get(f"{servers['default']}/ready")
        assert ready.status_code == 503 and set(ready.json()["tasks"]) == set(TASKS)
        metrics = (await client.get(f"{servers['default']}/metrics")).text
    assert 'status="500"' not in metrics
    assert re.search(r'jv4_errors_total\{route="/v1/embeddings",status="400",task="[^"]*",'
                     r'type="invalid_request_error"\} [1-9]', metrics)
    assert 'jv4_backend_healthy{replica=' in metrics


# --- admission beyond the table -----------------------------------------------------------------

async def test_oversized_chunked_body_is_cut_off_while_streaming(servers: dict[str, str]) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the cap must act on the stream
        nonlocal sent
        yield b'{"input": "'
        for _ in range(64):
            sent += 64 * 1024
            yield b"x" * 64 * 1024
        yield b'"}'

    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(f"{servers['default']}/v1/embeddings", content=chunks(),
                                     headers={"Content-Type": "application/json"})
    # Without the cap the 4 MB text would be parsed and refused as too long (400), not 413.
    assert sent > MAX_BODY
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


async def test_client_disconnect_cancels_the_backend_call(prepared_dir: Path) -> None:
    """A replica that never answers /pooling: the router must hang up on it once the client leaves."""
    calls: list[bytes] = []
    backend_hung_up = asyncio.Event()

    async def replica(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request := await reader.readuntil(b"\r\n\r\n"):
                if request.startswith(b"GET /health"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    continue
                calls.append(request)
                await reader.read()  # returns at EOF: when the router closes this connection
                backend_hung_up.set()
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(replica, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    config = make_config(prepared_dir, url, backend={"request_timeout_s": 120.0})
    engine = await Engine.start(config)
    try:
        assert all(engine.readiness().values())
        async with InProcessServer(create_app(config, engine), config.router.port) as router:
            async with httpx.AsyncClient() as client:
                with pytest.raises(httpx.ReadTimeout):
                    await client.post(f"{router.url}/v1/embeddings", json={"input": "hello", "task": "code"},
                                      timeout=1.0)
            await asyncio.wait_for(backend_hung_up.wait(), timeout=5.0)
            assert len(calls) == 1 and calls[0].startswith(b"POST /pooling")
            assert [s.in_flight for s in engine.replica_stats()] == [0, 0, 0]
    finally:
        await engine.aclose()
        server.close()


# --- responses, docs and the command -----------------------------------------------------------

def test_response_rendering_matches_the_documented_shapes() -> None:
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(32).astype(np.float32) for _ in range(2)]
    result = EmbedResult(embeddings=vectors, prompt_tokens=7)
    floats = orjson.loads(render_embeddings(result, model="m", embedding_type="float", output=OutputKind.SINGLE))
    assert floats["object"] == "list" and floats["model"] == "m"
    assert floats["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [d["index"] for d in floats["data"]] == [0, 1] and floats["data"][0]["object"] == "embedding"
    np.testing.assert_array_equal(np.array(floats["data"][1]["embedding"], dtype=np.float32), vectors[1])
    packed = orjson.loads(render_embeddings(result, model="m", embedding_type="base64", output=OutputKind.SINGLE))
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), "<f4"), vectors[0])
    bits = orjson.loads(render_embeddings(result, model="m", embedding_type="ubinary", output=OutputKind.SINGLE))
    assert bits["data"][0]["embedding"] == np.packbits(vectors[0] > 0).tolist()

    matrices = [rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)]
    multi = EmbedResult(embeddings=matrices, prompt_tokens=8)
    rows = orjson.loads(render_embeddings(multi, model="m", embedding_type="float", output=OutputKind.MULTI))
    assert rows["data"][1]["object"] == "embeddings"
    np.testing.assert_array_equal(np.array(rows["data"][1]["embeddings"], dtype=np.float32), matrices[1])
    flat = orjson.loads(render_embeddings(multi, model="m", embedding_type="base64", output=OutputKind.MULTI))
    item = flat["data"][0]
    assert item["shape"] == [5, 8]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(item["embeddings"]), "<f4").reshape(5, 8),
                                  matrices[0])


async def test_openapi_documents_the_contract(servers: dict[str, str]) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        spec = (await client.get(f"{servers['default']}/openapi.json")).json()
        assert (await client.get(f"{servers['default']}/docs")).status_code == 200
    schema = spec["components"]["schemas"]["EmbeddingsRequest"]["properties"]
    assert set(schema) == {"model", "input", "dimensions", "encoding_format", "user", "task",
                           "return_multivector", "embedding_type", "encoding_type", "truncate", "late_chunking",
                           "return_dense", "multivector_pool_factor"}
    assert all(prop.get("description") for prop in schema.values())
    assert {"/v1/embeddings", "/v1/models", "/health", "/ready"} <= set(spec["paths"])
    documented = set(spec["paths"]["/v1/embeddings"]["post"]["responses"])
    statuses = {str(cls.status) for cls in _error_classes(Jv4Error) if cls.status != 500}  # 500: never on purpose
    assert statuses - documented == set() and {"502", "504"} <= statuses


async def test_models_lists_the_model_and_each_adapter(servers: dict[str, str]) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        models = (await client.get(f"{servers['keys']}/v1/models", headers=AUTH)).json()
    assert [m["id"] for m in models["data"]] == ["jina-embeddings-v4"] + [f"jina-embeddings-v4-{t}" for t in TASKS]


def test_router_command_starts_its_engine_and_stops(prepared_dir: Path, tmp_path: Path) -> None:
    """`jv4-vllm router --config` as users run it: engine from the config, uvicorn, clean SIGTERM exit."""
    config = make_config(prepared_dir)
    path = write_config(config, tmp_path / "router.yaml")
    url = f"http://127.0.0.1:{config.router.port}"
    process = subprocess.Popen([sys.executable, "-m", "jv4_vllm.cli", "router", "--config", str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until_up([f"{url}/health"], [process], timeout_s=120)  # alive ...
        ready = httpx.get(f"{url}/ready")  # ... but with no backend, not ready
        assert ready.status_code == 503 and "no healthy backend" in ready.json()["message"]
        bad = httpx.post(f"{url}/v1/embeddings", json={"input": "a", "dimensions": 3})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "dimensions"
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0].decode(errors="replace")
    # uvicorn shuts down cleanly, then re-raises SIGTERM so the exit status tells how it ended.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
