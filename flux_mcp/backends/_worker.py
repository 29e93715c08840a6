"""Between the event loop and a worker thread: the local backend's queue and thread plumbing.

The local backend runs its blocking work (loading a model, a denoising run) in worker threads and
holds one accelerator that only one job may use at a time. This module holds the generic parts:

- ``GpuQueue``: one job at a time, first come first served; waiting callers hear their place in line,
  and a full line (FLUX_MCP_MAX_QUEUED_JOBS) refuses newcomers at once;
- ``notifier``: progress reported from a worker thread, sent to the loop, never going backwards;
- ``finish_in_thread``: run a function in a worker thread to its end; when the awaiting task is
  cancelled, set a ``threading.Event`` the function polls, wait for the thread, and re-raise;
- ``with_heartbeat``: run a function in a worker thread to its end, saying so every few seconds;
- ``quiet``: a progress sink for internal waits nobody watches.

A thread's error is carried out of the task group as a value and raised after it, so callers get it
unwrapped (no ExceptionGroup).

Threads are waited for, never abandoned: the next job needs the device free. This module knows
nothing about diffusers, torch, the request model or the result store: only anyio, the error tree
and the ``Progress`` callback type.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from ..errors import BackendUnavailable
from .protocol import Progress

__all__ = ["GpuQueue", "finish_in_thread", "notifier", "quiet", "with_heartbeat"]

T = TypeVar("T")
#: (True, result) or (False, the exception raised).
_Outcome = tuple[bool, Any]


class GpuQueue:
    """One GPU job at a time, first come first served; waiting callers hear their place in line.

    At most ``max_waiting`` jobs may wait behind the running one (None: no bound); past that a
    caller is refused at once with a "busy, N jobs ahead, try later" error instead of joining a
    line that holds its inputs in memory for as long as the jobs ahead take.
    """

    def __init__(self, max_waiting: int | None = None) -> None:
        self._line: list[object] = []  # [the running job, then the waiting ones]
        self._moved: anyio.Event | None = None
        self._max_waiting = max_waiting

    def check_room(self) -> None:
        """Raise BackendUnavailable when the line is full (callers check before doing costly work)."""
        waiting = max(len(self._line) - 1, 0)
        if self._max_waiting is not None and waiting >= self._max_waiting:
            raise BackendUnavailable(
                f"the local GPU is busy: {len(self._line)} job(s) ahead of this one ({waiting} waiting, the "
                f"most FLUX_MCP_MAX_QUEUED_JOBS={self._max_waiting} allows). Try again later."
            )

    @contextlib.asynccontextmanager
    async def turn(self, progress: Progress, total: int, *, limited: bool = True) -> AsyncIterator[None]:
        """Wait for the GPU; ``limited`` callers are refused when the line is full (see check_room)."""
        if limited:
            self.check_room()  # no await between the check and joining the line
        ticket = object()
        self._line.append(ticket)
        try:
            told = 0
            while self._line[0] is not ticket:
                # Taken before awaiting progress, so a job that ends meanwhile still wakes us.
                moved = self._moved = self._moved or anyio.Event()
                position = self._line.index(ticket)
                if position != told:
                    await progress(0, total, f"waiting for the GPU: position {position}")
                    told = position
                await moved.wait()
            yield
        finally:
            self._line.remove(ticket)
            if self._moved is not None:
                self._moved.set()
                self._moved = None


def notifier(progress: Progress, total: int) -> Callable[[float, str], None]:
    """Progress from the worker thread, sent to the loop and never going backwards."""
    last = 0.0

    def notify(done: float, message: str) -> None:
        nonlocal last
        last = max(last, done)
        anyio.from_thread.run(progress, last, total, message)

    return notify


async def finish_in_thread(fn: Callable[..., T], *args: Any, cancelled: threading.Event) -> T:
    """``fn(*args)`` in a worker thread. Cancelled, it sets ``cancelled``, waits for the thread, re-raises.

    ``fn`` should poll ``cancelled`` and stop early; what it returns or raises then is dropped.
    """

    async def flag_on_cancel() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(flag_on_cancel)
        # Not abandoned: the thread holds the GPU until its step ends, and the next job must wait for it.
        outcome = await anyio.to_thread.run_sync(_captured, fn, *args)
        tg.cancel_scope.cancel()
    await anyio.lowlevel.checkpoint_if_cancelled()  # a cancellation that arrived during the run ends here
    return _unboxed(outcome)


async def with_heartbeat(
    fn: Callable[..., T], *args: Any, progress: Progress, total: int, message: str, every_s: float
) -> T:
    """``fn(*args)`` in a worker thread; ``message`` is sent now and, with the time so far, every ``every_s``."""
    started = time.perf_counter()
    await progress(0, total, message)
    async with anyio.create_task_group() as tg:

        async def heartbeat() -> None:
            while True:
                await anyio.sleep(every_s)
                await progress(0, total, f"{message}: {time.perf_counter() - started:.0f} s")

        tg.start_soon(heartbeat)
        # Not abandoned on cancellation: half-done work (a model half loaded) must not go on unseen.
        outcome = await anyio.to_thread.run_sync(_captured, fn, *args)
        tg.cancel_scope.cancel()
    return _unboxed(outcome)


def _captured(fn: Callable[..., T], *args: Any) -> _Outcome:
    """(True, result) or (False, exception): errors leave a task group unwrapped (no ExceptionGroup)."""
    try:
        return True, fn(*args)
    except Exception as exc:
        return False, exc


def _unboxed(outcome: _Outcome) -> Any:
    ok, value = outcome
    if not ok:
        raise value
    return value


async def quiet(progress: float, total: float | None, message: str) -> None:
    """A progress sink for internal waits nobody watches."""
