"""One reconcile task per DistillationJob, started by the job's watch events and ended when it goes.

Why not a kopf daemon: kopf puts its finalizer on every object a daemon serves (to stop the daemon
before the object disappears), so every job would block its own deletion whenever no operator runs.
These tasks need no finalizer: a task ends when the watch reports the job deleted or being deleted,
and on its own when a reconcile finds the job gone (a missed DELETED event cannot leave one behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kubedistill.operator")

Key = tuple[str, str]
# A stopped loop gets this long to finish its pass before it is cancelled (what the daemon had).
CANCEL_AFTER_S = 1.0


class StopFlag:
    """The `stopped` a loop polls between passes."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def __bool__(self) -> bool:
        return self._set


RunFn = Callable[[str, str, StopFlag, dict[str, Any] | None], Coroutine[Any, Any, None]]
WakeFn = Callable[[str, str], None]


@dataclass
class JobLoops:
    run: RunFn
    wake: WakeFn
    _tasks: dict[Key, tuple[asyncio.Task[None], StopFlag]] = field(default_factory=dict)

    def running(self) -> set[Key]:
        return set(self._tasks)

    def ensure(self, namespace: str, name: str, body: dict[str, Any] | None = None) -> bool:
        """Start the job's loop unless it runs; whether one was started."""
        key = (namespace, name)
        if key in self._tasks:
            return False
        stopped = StopFlag()
        task = asyncio.create_task(
            self.run(namespace, name, stopped, body), name=f"reconcile {namespace}/{name}"
        )
        self._tasks[key] = (task, stopped)
        task.add_done_callback(lambda done: self._finished(key, done))
        return True

    def _finished(self, key: Key, task: asyncio.Task[None]) -> None:
        if self._tasks.get(key, (None,))[0] is task:
            del self._tasks[key]
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "reconcile loop ended", exc_info=task.exception(), extra={"job": key[1], "namespace": key[0]}
            )

    async def stop(self, namespace: str, name: str) -> None:
        """Ask the loop to end after its current pass; cancel it if that takes too long."""
        entry = self._tasks.get((namespace, name))
        if entry is None:
            return
        task, stopped = entry
        stopped.set()
        self.wake(namespace, name)
        await asyncio.wait({task}, timeout=CANCEL_AFTER_S)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(ns, name) for ns, name in list(self._tasks)))
