"""An async pool of vLLM replicas for one deployment.

Least-outstanding-requests choice among healthy replicas, background health checks
that take a failing replica out and bring it back, one retry on another replica for
connection failures and 5xx (pooling calls are idempotent), per-call timeouts, and a
bounded wait queue (429 when full, 503 when nothing is healthy). A URL of the form
``dns+http://name:port`` is re-resolved periodically to ALL its addresses, so a
Kubernetes headless Service spreads load over every pod.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import dns.asyncresolver
import dns.exception
import aiohttp
import orjson

from jv4_vllm.config import BackendSettings
from jv4_vllm.errors import BackendError, BackendTimeoutError, BackendUnavailableError, OverloadedError

__all__ = ["BackendResponse", "Replica", "ReplicaPool", "ReplicaStats"]

log = logging.getLogger(__name__)
DNS_SCHEME = "dns+"


_JSON = {"content-type": "application/json"}


@dataclass(frozen=True, slots=True)
class BackendResponse:
    """What the engine needs of a replica's answer: status, the bytes-format metadata header, the body."""

    status: int
    metadata: str | None
    content: bytes

    def error_message(self) -> str:
        """vLLM's error text, from its JSON error body when it sent one."""
        try:
            detail = orjson.loads(self.content)
        except orjson.JSONDecodeError:
            return self.content[:300].decode(errors="replace")
        if isinstance(detail, dict):
            error = detail.get("error")
            if isinstance(error, dict) and error.get("message"):
                return str(error["message"])
            if detail.get("message"):
                return str(detail["message"])
        return str(detail)[:300]


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    task: str
    url: str
    healthy: bool
    in_flight: int


@dataclass(eq=False, slots=True)
class Replica:
    url: str
    healthy: bool = False
    in_flight: int = 0
    failures: int = 0
    source: str = field(default="", repr=False)  # the configured URL it came from


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

    def __init__(self, task: str, urls: list[str], settings: BackendSettings) -> None:
        self.task = task
        self.settings = settings
        self._static = [u.rstrip("/") for u in urls if not u.startswith(DNS_SCHEME)]
        self._dns = [u[len(DNS_SCHEME):].rstrip("/") for u in urls if u.startswith(DNS_SCHEME)]
        self.replicas: list[Replica] = [Replica(url=u, source=u) for u in self._static]
        self._session: aiohttp.ClientSession | None = None  # needs a running loop: made in start()
        self._capacity = asyncio.Condition()
        self._waiting = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Resolve names and check health once, then keep both fresh in the background."""
        # aiohttp rather than httpx: measured under load, it costs the router less than half the
        # CPU per call. No proxies from the environment: replicas are reached directly.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
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
            await self._notify()

    async def _probe(self, replica: Replica) -> None:
        try:
            async with self._http().get(f"{replica.url}/health",
                                        timeout=aiohttp.ClientTimeout(total=self.settings.connect_timeout_s)) as response:
                ok = response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            ok = False
        if ok != replica.healthy:
            log.warning("%s: replica %s is %s", self.task, replica.url, "healthy" if ok else "unhealthy")
        replica.healthy = ok

    async def check_health(self) -> None:
        await asyncio.gather(*(self._probe(r) for r in self.replicas))
        await self._notify()

    async def _notify(self) -> None:
        async with self._capacity:
            self._capacity.notify_all()

    def healthy(self) -> bool:
        return any(r.healthy for r in self.replicas)

    def stats(self) -> list[ReplicaStats]:
        return [ReplicaStats(self.task, r.url, r.healthy, r.in_flight) for r in self.replicas]

    def _unavailable(self) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"no healthy backend for task {self.task!r}; retry shortly",
            retry_after=max(1.0, self.settings.health_interval_s),
        )

    def _choose(self, exclude: set[int]) -> Replica | None:
        limit = self.settings.max_concurrency_per_replica
        candidates = [r for r in self.replicas if r.healthy and id(r) not in exclude and r.in_flight < limit]
        if not candidates:
            return None
        least = min(r.in_flight for r in candidates)
        return random.choice([r for r in candidates if r.in_flight == least])

    async def _acquire(self, exclude: set[int]) -> Replica:
        """A replica with spare capacity; waits in a bounded queue when all are busy."""
        async with self._capacity:
            while True:
                if not any(r.healthy and id(r) not in exclude for r in self.replicas):
                    raise self._unavailable()
                replica = self._choose(exclude)
                if replica is not None:
                    replica.in_flight += 1
                    return replica
                if self._waiting >= self.settings.max_queue:
                    raise OverloadedError(f"task {self.task!r} is at capacity; retry shortly", retry_after=1.0)
                self._waiting += 1
                try:
                    await asyncio.wait_for(self._capacity.wait(), timeout=self.settings.health_interval_s)
                except asyncio.TimeoutError:
                    pass
                finally:
                    self._waiting -= 1

    async def _release(self, replica: Replica) -> None:
        async with self._capacity:
            replica.in_flight -= 1
            self._capacity.notify()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ReplicaPool.start() was not awaited")
        return self._session

    async def _call(self, replica: Replica, path: str, payload: bytes) -> BackendResponse:
        async with self._http().post(f"{replica.url}{path}", data=payload, headers=_JSON) as response:
            return BackendResponse(response.status, response.headers.get("metadata"), await response.read())

    async def post(self, path: str, body: dict[str, Any]) -> BackendResponse:
        """POST to one replica; on a connection failure or 5xx, once more on another.

        4xx answers are returned to the caller: they are about the request, not the replica.
        """
        payload = orjson.dumps(body)
        tried: set[int] = set()
        last_error: Exception | None = None
        for _ in range(2):
            try:
                replica = await self._acquire(tried)
            except BackendUnavailableError:
                if last_error is not None:
                    break
                raise
            tried.add(id(replica))
            try:
                response = await self._call(replica, path, payload)
            except asyncio.TimeoutError as exc:
                last_error = exc
                replica.failures += 1
                continue
            except aiohttp.ClientError as exc:  # refused, reset, or died mid-answer
                last_error = exc
                replica.failures += 1
                replica.healthy = False
                log.warning("%s: %s failed (%s); retrying elsewhere", self.task, replica.url, exc)
                continue
            finally:
                await self._release(replica)
            if response.status >= 500:
                last_error = BackendError(f"replica answered {response.status}")
                replica.failures += 1
                continue
            replica.failures = 0
            return response
        if isinstance(last_error, asyncio.TimeoutError):
            raise BackendTimeoutError(f"task {self.task!r}: the backend did not answer in time")
        if isinstance(last_error, BackendError):
            raise BackendError(f"task {self.task!r}: the backend failed ({last_error.message})")
        raise self._unavailable()
