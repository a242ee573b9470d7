"""Waiting with a deadline: poll a condition instead of sleeping a fixed time and hoping.

A fixed sleep is either too long (slow tests) or too short on a loaded box (flaky tests);
polling returns as soon as the condition holds and, when it never does, fails naming what
it waited for and the last value it saw.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeoutError(AssertionError):
    """A condition did not hold in time (an AssertionError, so pytest shows it as a failure)."""


def _describe(what: str | None, pred: object) -> str:
    return what or getattr(pred, "__qualname__", None) or repr(pred)


def wait_until(pred: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.02,
               what: str | None = None) -> T:
    """Call ``pred`` until it returns a truthy value and return that value; raise
    :class:`WaitTimeoutError` naming ``what`` (default: the predicate's name) after
    ``timeout`` seconds. ``pred`` is called at least once, and once more at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeoutError(f"waited {timeout}s for {_describe(what, pred)}; "
                                   f"last value {value!r}")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


async def await_until(pred: Callable[[], Awaitable[T]], *, timeout: float = 10.0,
                      interval: float = 0.02, what: str | None = None) -> T:
    """:func:`wait_until` for a coroutine predicate, sleeping without blocking the loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = await pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeoutError(f"waited {timeout}s for {_describe(what, pred)}; "
                                   f"last value {value!r}")
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
