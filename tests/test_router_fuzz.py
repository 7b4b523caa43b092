"""Property-based fuzzing of ``POST /v1/embeddings``: whatever a client sends, never a 500.

The real router app over a real Engine (the prepared demo checkpoint) runs on uvicorn, first
with NO backend behind it: every answer must be a 4xx with the OpenAI error body, or a 503
with Retry-After when the request was valid and only the backend is missing; afterwards the
router must still be healthy. Then the same bodies go to a router over the LIVE vLLM
deployments, so valid requests reach the engine, the model and the pooling: every answer is
a 200 with one embedding per input, or a 4xx. Bodies are generated around every documented
field (right and wrong types, huge and negative numbers, lone surrogates, random and mangled
images, random nesting), plus raw bytes under random content types.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from vllm_stack import free_port

from jv4_vllm.config import Config
from jv4_vllm.router import create_app

pytestmark = pytest.mark.timeout(300)

TASKS = ("retrieval", "text-matching", "code")
MODEL = "jina-embeddings-v4"
MAX_BODY = 256 * 1024
ERROR_KEYS = {"message", "type", "param", "code", "request_id"}
# Derandomized: CI runs the same 300 examples every time (long random runs are for hunting, by hand).
FUZZ = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Against live vLLM every valid example costs a model call: fewer, still the same every run.
LIVE_FUZZ = settings(FUZZ, max_examples=100)
LIMITS = {"max_inputs_per_request": 8, "max_request_bytes": MAX_BODY, "max_image_bytes": 64 * 1024,
          "max_image_pixels": 1_000_000}
NO_KEYS = {"host": "127.0.0.1", "api_keys_env": "JV4_TEST_UNSET_KEYS"}


class ThreadedRouter:
    """The router on a real uvicorn server in a thread of its own, so tests can call it synchronously."""

    def __init__(self, config: Config) -> None:
        self.url = f"http://127.0.0.1:{config.router.port}"
        self._server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=config.router.port,
                                                     log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, name="router", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the router did not start (see the log above)")
            self._thread.join(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(30)


@pytest.fixture(scope="module")
def router(prepared_dir: Path) -> Iterator[httpx.Client]:
    """Nothing listens at the deployments' URLs."""
    config = Config.model_validate({
        "model_name": MODEL,
        "prepared_dir": str(prepared_dir),
        "router": {**NO_KEYS, "port": free_port()},
        "deployments": {task: {"urls": [f"http://127.0.0.1:{free_port()}"]} for task in TASKS},
        "vllm": {"max_model_len": 512},
        "limits": LIMITS,
    })
    with ThreadedRouter(config) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def live_router(vllm_stack: Config) -> Iterator[httpx.Client]:
    """The same limits, over the running vLLM deployments of the three tasks."""
    config = Config.model_validate({**vllm_stack.model_dump(mode="json"), "router": {**NO_KEYS, "port": free_port()},
                                    "limits": LIMITS})
    with ThreadedRouter(config) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


# --- strategies -----------------------------------------------------------------------------

def _image(fmt: str, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (24, 16), (200, 40, 90) if mode == "RGB" else 7).save(out, format=fmt)
    return out.getvalue()


IMAGES = [_image(f) for f in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")] + [_image("PNG", "P"), _image("ICO")]

# Any text, lone surrogates included (hypothesis leaves them out unless asked).
chars = st.characters() | st.characters(categories=["Cs"])
texts = st.text(chars, max_size=40)
numbers = (st.integers() | st.integers(min_value=-(10**40), max_value=10**40)
           | st.floats(allow_nan=True, allow_infinity=True))
scalars = st.none() | st.booleans() | numbers | texts
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                           max_leaves=12)


@st.composite
def mangled_images(draw: st.DrawFn) -> bytes:
    """A real image with a few bytes overwritten, cut short, or grown: the decoder's edge cases."""
    data = bytearray(draw(st.sampled_from(IMAGES)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(8, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=16))


image_bytes = st.sampled_from(IMAGES) | mangled_images() | st.binary(max_size=200)
image_values = st.one_of(
    image_bytes.map(lambda b: base64.b64encode(b).decode()),
    image_bytes.map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
    st.tuples(st.sampled_from(["image/png", "image/jpeg", "text/plain", "", "image/png;charset=x"]),
              image_bytes).map(lambda p: f"data:{p[0]};base64,{base64.b64encode(p[1]).decode()}"),
    st.sampled_from(["data:", "data:,", "data:image/png,abc", "http://127.0.0.1/a.png", "https://example.com/a.png",
                     "file:///etc/passwd", "ftp://x/y", "", "   ", "====", "ab=c"]),
    texts,
)
input_items = st.one_of(texts, st.fixed_dictionaries({"text": texts}), st.fixed_dictionaries({"image": image_values}))

# Right types with values good and bad, for every documented field ...
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from([MODEL, *(f"{MODEL}-{t}" for t in TASKS), "text-embedding-3-small", ""]),
    "input": texts | st.lists(input_items, min_size=1, max_size=10),
    "dimensions": st.sampled_from([8, 16, 32, 64, 128]) | st.integers() | st.sampled_from([2**63, -(10**30)]),
    "encoding_format": st.sampled_from(["float", "base64"]),
    "embedding_type": st.sampled_from(["float", "base64", "binary", "ubinary"]),
    "user": texts,
    "task": st.sampled_from([*TASKS, "retrieval.query", "retrieval.passage", "code.passage", "text-matching.query",
                             "retrieval.document", "classification", ".", ""]) | texts,
    "return_multivector": st.booleans(),
    "truncate": st.booleans(),
}
# ... and anything at all in their place: wrong types, random nesting, objects with random keys.
anything = json_values | st.lists(input_items | json_values, max_size=4) | st.dictionaries(
    st.sampled_from(["text", "image"]) | texts, json_values | image_values, max_size=3)
EXTRA = "<an unknown field>"


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """A plausible request with at most one field broken, so every layer behind validation gets reached."""
    optional = {name: st.none() | strategy for name, strategy in FIELDS.items() if name != "input"}
    body = {name: value for name, value in draw(st.fixed_dictionaries({"input": FIELDS["input"]}, optional=optional))
            .items() if value is not None}
    broken = draw(st.none() | st.sampled_from([*FIELDS, EXTRA]))
    if broken == EXTRA:
        body[draw(texts)] = draw(anything)
    elif broken is not None:
        body[broken] = draw(anything)
    return body


bodies = st.one_of(requests(), requests(), requests(), json_values)  # mostly plausible, sometimes anything

# Every field with a value the docs allow, few combinations that conflict (the bodies above have those):
# the live backends get work.
plain_texts = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40).filter(str.strip)
b64_images = st.sampled_from(IMAGES).map(lambda b: base64.b64encode(b).decode())
VALID_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.just(MODEL),
    "dimensions": st.sampled_from([8, 16, 32, 64, 128]),
    "embedding_type": FIELDS["embedding_type"],
    "task": st.sampled_from([*TASKS, "retrieval.query", "retrieval.passage", "code.query", "code.passage"]),
    "return_multivector": st.booleans(),
    "truncate": st.booleans(),
}
valid_items = st.one_of(plain_texts, st.fixed_dictionaries({"text": plain_texts}),
                        st.fixed_dictionaries({"image": b64_images}))
valid_requests = st.fixed_dictionaries(
    {"input": plain_texts | st.lists(valid_items, min_size=1, max_size=8)},
    optional={name: strategy for name, strategy in VALID_FIELDS.items()})
live_bodies = st.one_of(valid_requests, valid_requests, bodies)


def encode(body: Any, how: str) -> bytes:
    """JSON text of ``body``; lone surrogates as escapes, or raw (which is not UTF-8)."""
    if how == "escaped":
        return json.dumps(body, ensure_ascii=True, allow_nan=True).encode("ascii")
    return json.dumps(body, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


content_types = st.one_of(
    st.sampled_from(["application/json", "application/json; charset=latin-1", "application/vnd.api+json",
                     "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz",
                     "application/octet-stream", "application/", "/json", ";", ""]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(str.strip),  # h11 refuses edge spaces
    st.none(),
)
nesting = st.integers(1, 20_000).map(lambda n: b'{"input": ' + b"[" * n + b"]" * n + b"}")
raw_bodies = st.binary(max_size=300) | nesting | st.builds(encode, bodies, st.sampled_from(["escaped", "raw"]))


# --- the property ---------------------------------------------------------------------------

def post(client: httpx.Client, content: bytes, content_type: str | None) -> httpx.Response:
    headers = {"Content-Type": content_type} if content_type is not None else {}
    return client.post("/v1/embeddings", content=content, headers=headers)


def check(response: httpx.Response) -> None:
    """A 4xx with the OpenAI error body, or 503 + Retry-After for a valid request with no backend."""
    status = response.status_code
    assert 400 <= status < 500 or status == 503, f"{status}: {response.text[:500]}"
    assert response.headers["content-type"] == "application/json", response.headers
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and isinstance(error["message"], str) and isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    if status == 503:
        assert error["code"] == "no_healthy_backend" and int(response.headers["retry-after"]) >= 1


@FUZZ
@given(body=bodies, how=st.sampled_from(["escaped", "raw"]))
def test_any_json_body_is_refused_cleanly(router: httpx.Client, body: Any, how: str) -> None:
    check(post(router, encode(body, how), "application/json"))


@FUZZ
@given(content=raw_bodies, content_type=content_types)
def test_any_bytes_under_any_content_type_are_refused_cleanly(router: httpx.Client, content: bytes,
                                                             content_type: str | None) -> None:
    check(post(router, content, content_type))


# --- what the fuzzing turned up, and edges it reaches only rarely ----------------------------

JSON = "application/json"
DEEP = 5_000
REGRESSIONS = [
    # A field NAME with a lone surrogate: pydantic cannot read it; the message said "must be a JSON object".
    ("surrogate-field-name", b'{"input": "a", "\\ud800": 1}', JSON, 400, None, "field name is not valid Unicode"),
    ("surrogate-field-name-raw-utf8", '{"input": "a", "\ud800": 1}'.encode("utf-8", "surrogatepass"), JSON, 400, None,
     "field name is not valid Unicode"),
    ("surrogate-field-name-in-input", b'{"input": [{"text": "a", "\\udfff": 0}]}', JSON, 400, "input[0]",
     r"input\[0\]: a field name is not valid Unicode"),
    # A JSON object under another content type: the message said "must be a JSON object".
    ("json-as-text-plain", b'{"input": "a"}', "text/plain", 400, None, "Content-Type: application/json"),
    ("json-as-form", b'{"input": "a"}', "application/x-www-form-urlencoded", 400, None, "Content-Type: application/json"),
    # Edges: parsed the way the JSON spec allows, or refused as unparsable, never a 500.
    ("surrogate-text", b'{"input": ["ok", "\\udfff"]}', JSON, 400, "input[1]", "not valid Unicode"),
    ("nesting-past-the-recursion-limit", b'{"input": ' + b"[" * DEEP + b"]" * DEEP + b"}", JSON, 400, None,
     "error parsing the body"),
    ("integer-of-5000-digits", b'{"input": "a", "dimensions": ' + b"9" * 5000 + b"}", JSON, 400, None,
     "error parsing the body"),
    ("nan-dimensions", b'{"input": "a", "dimensions": NaN}', JSON, 400, "dimensions", "valid integer"),
    ("utf16-json", json.dumps({"input": "a"}).encode("utf-16"), JSON, 503, None, "no healthy backend"),
    ("no-content-type", b'{"input": "a"}', None, 400, None, "Content-Type: application/json"),
    ("json-suffix-content-type", b'{"input": "a"}', "application/vnd.api+json", 503, None, "no healthy backend"),
]


@pytest.mark.parametrize(("content", "content_type", "status", "param", "match"), [row[1:] for row in REGRESSIONS],
                         ids=[row[0] for row in REGRESSIONS])
def test_regression(router: httpx.Client, content: bytes, content_type: str | None, status: int, param: str | None,
                    match: str) -> None:
    response = post(router, content, content_type)
    check(response)
    error = response.json()["error"]
    assert response.status_code == status and error["param"] == param, response.text
    assert re.search(match, error["message"]), error["message"]


def check_live(response: httpx.Response, body: Any) -> None:
    """With live backends: a 200 with one embedding per input in order, or a clean refusal."""
    if response.status_code != 200:
        check(response)
        return
    payload = response.json()
    count = 1 if isinstance(body["input"], str) else len(body["input"])
    assert [item["index"] for item in payload["data"]] == list(range(count)), response.text[:500]
    assert payload["object"] == "list" and payload["usage"]["prompt_tokens"] > 0


@pytest.mark.vllm
@LIVE_FUZZ
@given(body=live_bodies, how=st.sampled_from(["escaped", "raw"]))
def test_any_json_body_with_live_backends_is_embedded_or_refused_cleanly(live_router: httpx.Client, body: Any,
                                                                         how: str) -> None:
    check_live(post(live_router, encode(body, how), "application/json"), body)


def _statuses(client: httpx.Client) -> dict[str, float]:
    """Requests the router counted, by HTTP status."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "jv4_requests_total":
                counts[sample.labels["status"]] = counts.get(sample.labels["status"], 0.0) + sample.value
    return counts


@pytest.mark.vllm
def test_the_live_fuzzing_reached_the_model(live_router: httpx.Client) -> None:
    statuses = _statuses(live_router)
    assert statuses.get("200", 0) >= 20 and statuses.get("400", 0) >= 20, statuses
    assert not [status for status in statuses if status.startswith("5") and status != "503"], statuses


def test_router_is_healthy_after_the_fuzzing(router: httpx.Client) -> None:
    assert router.get("/health").status_code == 200
    bad = router.post("/v1/embeddings", json={"input": "a", "dimensions": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "dimensions"
    valid = router.post("/v1/embeddings", json={"input": ["a", {"image": base64.b64encode(IMAGES[0]).decode()}]})
    assert valid.status_code == 503 and valid.headers["retry-after"]
    statuses = _statuses(router)
    assert "500" not in statuses and "400" in statuses and "503" in statuses
