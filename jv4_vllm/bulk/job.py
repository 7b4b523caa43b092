"""What run-batch and embed share: settings, the duplicate check and the send loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import httpx

from jv4_vllm.bulk.keys import KeySet, key_hash
from jv4_vllm.bulk.pacing import Pacer, PacingSettings
from jv4_vllm.bulk.shard import Shard
from jv4_vllm.bulk.transport import Answer, RetrySettings, Transport, send

__all__ = ["JobSettings", "Sender", "check_unique"]


@dataclass(frozen=True)
class JobSettings:
    shard: Shard = field(default_factory=Shard)
    pacing: PacingSettings = field(default_factory=PacingSettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    quiet: bool = False


def check_unique(keys: Callable[[], Iterable[tuple[str, int]]], what: str) -> None:
    """Refuse (ValueError, before anything is sent) an input whose ids repeat.

    ``keys`` yields (id, line) and is called once for the hashes and, only when some hash
    repeats, once more to name the ids exactly (a hash collision alone is no duplicate).
    """
    repeated = KeySet.repeated(key_hash(key) for key, _ in keys())
    if not repeated:
        return
    lines: dict[str, list[int]] = {}
    for key, line in keys():
        if key_hash(key) in repeated:
            lines.setdefault(key, []).append(line)
    dupes = {key: where for key, where in lines.items() if len(where) > 1}
    if not dupes:
        return
    shown = "; ".join(f"{key!r} on lines {', '.join(map(str, where[:5]))}" for key, where in list(dupes.items())[:5])
    raise ValueError(f"{len(dupes)} duplicate {what} value(s), nothing was sent: {shown}")


class Sender:
    """Sends requests with adaptive concurrency; at most ``queue`` requests wait in memory."""

    def __init__(self, transport: Transport, settings: JobSettings) -> None:
        self.transport = transport
        self.pacer = Pacer(settings.pacing)
        self.retry = settings.retry
        self._room = asyncio.Semaphore(settings.pacing.maximum * 2)
        self._room_ahead = asyncio.Semaphore(settings.pacing.maximum * 2)
        self._tasks: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None

    async def submit(self, path: str, body: bytes | Callable[[], bytes], items: int,
                     on_answer: Callable[[Answer | httpx.TransportError], Awaitable[None] | None],
                     *, ahead: bool = False) -> None:
        """Queue one request; ``on_answer`` gets its answer (or the final connection failure).

        ``body`` may be a function that builds it, called when the request is sent: queued
        requests then hold no body (page batches of one PDF share its bytes until sent).
        ``ahead`` requests (long ones) have room of their own and take free slots first.
        """
        if self._failure is not None:
            raise self._failure
        room = self._room_ahead if ahead else self._room
        await room.acquire()

        async def run() -> None:
            try:
                await self.call(path, body, items, on_answer, ahead=ahead)
            except BaseException as exc:  # noqa: BLE001 - re-raised from submit/drain
                self._failure = self._failure or exc
            finally:
                room.release()

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def call(self, path: str, body: bytes | Callable[[], bytes], items: int,
                   on_answer: Callable[[Answer | httpx.TransportError], Awaitable[None] | None],
                   *, ahead: bool = False) -> None:
        """Send one request in the caller's task and hand its answer on.

        An answer's follow-ups (the inputs of a refused request, one by one) go this way:
        they take no room of their own, so a callback never waits for room that queued
        requests hold while those wait for callbacks to finish.
        """
        payload = body() if callable(body) else body
        try:
            outcome: Answer | httpx.TransportError = await send(
                self.transport, self.pacer, path, payload, items=items, retry=self.retry, ahead=ahead)
        except httpx.TransportError as exc:
            outcome = exc
        result = on_answer(outcome)
        if result is not None:
            await result

    async def drain(self) -> None:
        """Wait for every queued request; re-raise the first failure of a callback."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks))
        if self._failure is not None:
            raise self._failure
