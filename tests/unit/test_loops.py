"""The per-job reconcile tasks that replace kopf's daemon (whose finalizer would be on every job)."""

from __future__ import annotations

import asyncio
from typing import Any

from kubedistill.handlers.loops import JobLoops, StopFlag


def test_one_loop_per_job_stopped_on_request_and_gone_when_it_ends() -> None:
    async def scenario() -> None:
        passes: dict[str, int] = {}
        wakeups: dict[str, asyncio.Event] = {}
        finish = asyncio.Event()

        async def run(namespace: str, name: str, stopped: StopFlag, body: dict[str, Any] | None) -> None:
            wakeup = wakeups.setdefault(name, asyncio.Event())
            while not stopped:
                passes[name] = passes.get(name, 0) + 1
                if name == "short" and finish.is_set():
                    return  # what a loop does when it finds its job gone
                wakeup.clear()
                await wakeup.wait()

        def wake(namespace: str, name: str) -> None:
            wakeups[name].set()

        loops = JobLoops(run=run, wake=wake)
        assert loops.ensure("ns", "a", {}) and loops.ensure("ns", "short")
        assert not loops.ensure("ns", "a")  # a second event finds it running
        await asyncio.sleep(0)
        assert loops.running() == {("ns", "a"), ("ns", "short")}
        await loops.stop("ns", "a")  # the loop notices `stopped` when woken
        assert loops.running() == {("ns", "short")} and passes["a"] == 1
        finish.set()
        wake("ns", "short")
        await asyncio.sleep(0.01)
        assert loops.running() == set()  # it ended by itself and is forgotten
        await loops.stop("ns", "short")  # stopping what is gone is a no-op

    asyncio.run(scenario())


def test_a_loop_that_ignores_stop_is_cancelled() -> None:
    async def scenario() -> None:
        cancelled = asyncio.Event()

        async def stubborn(namespace: str, name: str, stopped: StopFlag, body: dict[str, Any] | None) -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        loops = JobLoops(run=stubborn, wake=lambda ns, name: None)
        loops.ensure("ns", "x")
        await asyncio.sleep(0)
        await loops.stop_all()
        assert cancelled.is_set() and loops.running() == set()

    asyncio.run(scenario())
