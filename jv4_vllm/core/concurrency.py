"""Run coroutines together, failing as one: the first error cancels the rest and is raised as itself.

``asyncio.TaskGroup`` wraps failures in an ``ExceptionGroup``; callers of the engine and the
client catch :mod:`jv4_vllm.errors` classes, so the group is unwrapped here, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

__all__ = ["all_or_first_error"]

T = TypeVar("T")


async def all_or_first_error(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """The coroutines' results in order; on the first failure the others are cancelled and it is raised."""
    tasks: list[asyncio.Task[T]] = []
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in coroutines]
    except ExceptionGroup as failure:
        raise failure.exceptions[0] from None
    return [task.result() for task in tasks]
