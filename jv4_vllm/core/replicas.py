"""An async pool of vLLM replicas for one deployment.

Least-outstanding-tokens choice among healthy replicas, background health checks that
take a failing replica out and bring it back, and one retry on another replica when a
replica refuses the connection or answers 5xx (pooling calls are idempotent).

A 5xx is judged before anyone is blamed: when the retry on a second replica fails the same way,
the request is at fault (an input that breaks a kernel), no replica is penalised and the payload
is remembered as poison. A replica leaves the rotation by its own health only: a refused
connection, a failed health check, or 5xx for ``EJECT_AFTER_FAILURES`` different payloads in a
row, so one client resending a poison input never darkens the task for the others. A timeout
is not retried: the slowest calls would cost the GPU twice; it is a 504. Waiting happens
before a call is sent (:mod:`jv4_vllm.core.admission`), so the per-call timeout measures
vLLM's work only. A URL of the form ``dns+http://name:port`` is re-resolved periodically
to ALL its addresses, so a Kubernetes headless Service spreads load over every pod.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import dns.asyncresolver
import dns.exception
import orjson

from jv4_vllm.config import BackendSettings
from jv4_vllm.core.request_id import current_request_id
from jv4_vllm.errors import BackendError, BackendTimeoutError, BackendUnavailableError

__all__ = ["INPUT_FAILED", "BackendRejection", "Replica", "ReplicaPool", "ReplicaStats"]

log = logging.getLogger(__name__)
DNS_SCHEME = "dns+"
ERROR_BODY_LIMIT = 64 * 1024
KEEPALIVE_S = 4.0
EJECT_AFTER_FAILURES = 3  # 5xx for this many different payloads in a row take a replica out until its health check
POISON_MEMORY = 1024  # payload digests remembered as the request's fault (every replica tried answered 5xx)
INPUT_FAILED = "input_failed"  # BackendError code: every replica tried failed on this payload
T = TypeVar("T")

_JSON = {"content-type": "application/json"}


class BackendRejection(Exception):
    """A replica answered 4xx: something about the request, not the replica."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_message(content: bytes) -> str:
    """vLLM's error text, from its JSON error body when it sent one."""
    try:
        detail = orjson.loads(content)
    except orjson.JSONDecodeError:
        return content[:300].decode(errors="replace").strip()
    if isinstance(detail, dict):
        error = detail.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:1000]
        for key in ("message", "detail"):
            if detail.get(key):
                return str(detail[key])[:1000]
    return str(detail)[:300]


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    task: str
    url: str
    healthy: bool
    in_flight: int
    tokens_in_flight: int


@dataclass(eq=False, slots=True)
class Replica:
    url: str
    healthy: bool = False
    in_flight: int = 0
    tokens_in_flight: int = 0
    failures: int = 0  # consecutive failures (5xx: different payloads only), reset by a success
    source: str = field(default="", repr=False)  # the configured URL it came from
    failed_payloads: set[int] = field(default_factory=set, repr=False)  # digests of this 5xx streak

    def succeeded(self) -> None:
        self.failures = 0
        self.failed_payloads.clear()

    def blame(self, digest: int) -> None:
        """A 5xx for the payload ``digest``: counts once per payload, so a resent input counts once."""
        self.failed_payloads.add(digest)
        self.failures = len(self.failed_payloads)

    def absolve(self, digest: int) -> None:
        """The payload failed elsewhere too: the request's fault, not this replica's."""
        self.failed_payloads.discard(digest)
        self.failures = len(self.failed_payloads)


async def _resolve(host: str, port: int, server: str | None = None) -> list[str]:
    """Every A/AAAA address of ``host``: from the system resolver, or asked of ``server`` ("host:port").

    Raises OSError when the name does not resolve, whichever resolver answered.
    """
    if server is None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return sorted({info[4][0] for info in infos})
    where = urlsplit(f"//{server}")
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [where.hostname or ""]
    resolver.port = where.port or 53
    try:
        answers = await resolver.resolve_name(host)
    except dns.exception.DNSException as exc:
        raise OSError(f"{host} via {server}: {exc}") from exc
    return sorted(set(answers.addresses()))


def _join_host(scheme: str, address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}"


class ReplicaPool:
    """Replicas of one task's vLLM deployment behind one ``post`` call."""

    def __init__(self, task: str, urls: list[str], settings: BackendSettings,
                 on_change: Callable[[], None] = lambda: None, health_path: str = "/health") -> None:
        self.task = task
        self.health_path = health_path  # what a health check GETs (peer routers answer another path)
        self.settings = settings
        self._static = [u.rstrip("/") for u in urls if not u.startswith(DNS_SCHEME)]
        self._dns = [u[len(DNS_SCHEME):].rstrip("/") for u in urls if u.startswith(DNS_SCHEME)]
        self.replicas: list[Replica] = [Replica(url=u, source=u) for u in self._static]
        self._session: aiohttp.ClientSession | None = None  # needs a running loop: made in start()
        self._on_change = on_change  # healthy replicas changed: the token budget follows
        self._tasks: list[asyncio.Task[None]] = []
        self._poison: OrderedDict[int, None] = OrderedDict()  # payloads every replica tried failed on

    async def start(self) -> None:
        """Resolve names and check health once, then keep both fresh in the background."""
        # aiohttp rather than httpx: measured under load, it costs the router less than half the
        # CPU per call. No proxies from the environment: replicas are reached directly.
        self._session = aiohttp.ClientSession(
            # Idle connections close before vLLM's server (uvicorn, 5 s keep-alive) closes them, so a
            # request is not written into a connection the server is dropping.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout_s,
                                          connect=self.settings.connect_timeout_s),
        )
        await self.refresh_dns()
        await self.check_health()
        self._tasks = [asyncio.create_task(self._every(self.settings.health_interval_s, self.check_health))]
        if self._dns:
            self._tasks.append(asyncio.create_task(self._every(self.settings.dns_refresh_s, self.refresh_dns)))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _every(self, seconds: float, job: Any) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:  # a background job must never die
                log.exception("%s: background job failed", self.task)

    async def refresh_dns(self) -> None:
        """Replace the DNS-derived replicas with the names' current addresses, keeping known state."""
        if not self._dns:
            return
        wanted: dict[str, str] = {}
        for source in self._dns:
            parts = urlsplit(source)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                addresses = await _resolve(parts.hostname or "", port, self.settings.dns_server)
            except OSError as exc:
                log.warning("%s: cannot resolve %s: %s", self.task, source, exc)
                addresses = [urlsplit(r.url).hostname or "" for r in self.replicas if r.source == source]
            for address in addresses:
                wanted[_join_host(parts.scheme, address, port)] = source
        current = {r.url: r for r in self.replicas}
        fresh = [Replica(url=u, source=s) for u, s in wanted.items() if u not in current]
        self.replicas = [r for r in self.replicas if r.source in self._static or r.url in wanted] + fresh
        if fresh:
            await asyncio.gather(*(self._probe(r) for r in fresh))
        self._on_change()

    async def _probe(self, replica: Replica) -> None:
        try:
            async with self._http().get(f"{replica.url}{self.health_path}",
                                        timeout=aiohttp.ClientTimeout(total=self.settings.connect_timeout_s)) as response:
                ok = response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            ok = False
        if ok and not replica.healthy:
            replica.succeeded()
        self._set_health(replica, ok)

    def _set_health(self, replica: Replica, ok: bool) -> None:
        if ok != replica.healthy:
            log.warning("%s: replica %s is %s", self.task, replica.url, "healthy" if ok else "unhealthy")
            replica.healthy = ok
            self._on_change()

    async def check_health(self) -> None:
        await asyncio.gather(*(self._probe(r) for r in self.replicas))

    def healthy(self) -> bool:
        return any(r.healthy for r in self.replicas)

    def healthy_count(self) -> int:
        return sum(r.healthy for r in self.replicas)

    def stats(self) -> list[ReplicaStats]:
        return [ReplicaStats(self.task, r.url, r.healthy, r.in_flight, r.tokens_in_flight) for r in self.replicas]

    def _unavailable(self) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"no healthy backend for task {self.task!r}; retry shortly",
            retry_after=max(1.0, self.settings.health_interval_s),
        )

    def _choose(self, exclude: set[int]) -> Replica:
        candidates = [r for r in self.replicas if r.healthy and id(r) not in exclude]
        if not candidates:
            raise self._unavailable()
        # A replica that just failed comes last; among the rest, the least loaded in tokens.
        return min(candidates, key=lambda r: (r.failures, r.tokens_in_flight, r.in_flight))

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ReplicaPool.start() was not awaited")
        return self._session

    async def call(self, path: str, body: dict[str, Any], tokens: int,
                   consume: Callable[[aiohttp.ClientResponse], Awaitable[T]]) -> T:
        """POST ``body`` to one replica and let ``consume`` read its 200 answer as it streams in.

        A refused or reset connection, or a 5xx, is retried once on another replica (vLLM's
        message is kept; a 5xx there too raises BackendError with code ``INPUT_FAILED`` and
        penalises neither); a connection dropped mid-request, even mid-answer, is retried too (on
        the same replica when it is the only one), so ``consume`` must undo a partial read when it
        raises; a timeout is a 504 at once; a 4xx raises :class:`BackendRejection`.
        """
        payload = orjson.dumps(body)
        tried: set[int] = set()
        failure = ""
        dropped: Replica | None = None  # a replica that dropped the connection mid-request
        suspect: Replica | None = None  # a replica that answered 5xx: blamed only if another one serves
        digest = 0
        for attempt in range(2):
            try:
                replica = self._choose(tried)
            except BackendUnavailableError:
                if attempt and dropped is not None and dropped.healthy:
                    replica = dropped  # the only replica dropped one connection: once more on another
                elif attempt:
                    break
                else:
                    raise
            tried.add(id(replica))
            replica.in_flight += 1
            replica.tokens_in_flight += tokens
            try:
                async with self._http().post(f"{replica.url}{path}", data=payload, headers=_JSON) as response:
                    if response.status == 200:
                        result = await consume(response)
                        replica.succeeded()
                        return result
                    content = await response.content.read(ERROR_BODY_LIMIT)
                if response.status < 500:
                    raise BackendRejection(response.status, error_message(content))
                failure = f"{replica.url} answered {response.status}: {error_message(content)}"
                log.warning("%s: request %s: %s", self.task, current_request_id(), failure)
                digest = digest or hash(payload)
                if suspect is not None:  # a second replica failed the same payload: the request's fault
                    suspect.absolve(digest)
                    self._remember_poison(digest)
                    raise BackendError(f"task {self.task!r}: every replica tried failed on this payload: {failure}",
                                       code=INPUT_FAILED)
                if digest in self._poison:
                    raise BackendError(f"task {self.task!r}: this payload failed on every replica before: "
                                       f"{failure}", code=INPUT_FAILED)
                replica.blame(digest)
                suspect = replica
                if replica.failures >= EJECT_AFTER_FAILURES:  # back in when its next health check passes
                    self._set_health(replica, False)
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
                replica.failures += 1
                log.warning("%s: request %s: %s did not answer within %.0f s", self.task, current_request_id(),
                            replica.url, self.settings.request_timeout_s)
                raise BackendTimeoutError(f"task {self.task!r}: the backend did not answer within "
                                          f"{self.settings.request_timeout_s:g} s") from None
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                    aiohttp.ClientPayloadError) as exc:
                failure = f"{replica.url} failed ({type(exc).__name__}: {exc})"
                replica.failures += 1
                refused = isinstance(exc, aiohttp.ClientConnectorError)
                if refused or dropped is replica:  # down, or dropping connections twice in a row
                    self._set_health(replica, False)
                dropped = None if refused else replica
                log.warning("%s: request %s: %s", self.task, current_request_id(), failure)
            finally:
                replica.in_flight -= 1
                replica.tokens_in_flight -= tokens
        if failure:
            raise BackendError(f"task {self.task!r}: the backend failed: {failure}")
        raise self._unavailable()

    def _remember_poison(self, digest: int) -> None:
        self._poison[digest] = None
        self._poison.move_to_end(digest)
        while len(self._poison) > POISON_MEMORY:
            self._poison.popitem(last=False)
