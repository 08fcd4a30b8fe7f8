"""The operator as a process of its own, `python -m kubedistill.handlers -n <namespace>`, as the chart runs it.

Tests start it per namespace with the settings a test cluster needs, and may kill it (SIGKILL, as when its
node dies) and start it again; every start writes a log of its own, and `logs()` reads them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Images come from the local kubelet's map, no node has a GPU, and retries and progress are quick.
TEST_SETTINGS = {
    "KUBEDISTILL_IMAGE_PULL_POLICY": "Never",
    "KUBEDISTILL_DEFAULT_TRAIN_GPUS": "0",
    "KUBEDISTILL_RETRY_BACKOFF_BASE_S": "0.5",
    "KUBEDISTILL_PROGRESS_INTERVAL_S": "1",
}


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class OperatorProcess:
    """One operator process watching one namespace; `env` is applied over :data:`TEST_SETTINGS`."""

    kubeconfig: Path
    namespace: str
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> OperatorProcess:
        self.starts += 1
        env = {**os.environ, **TEST_SETTINGS, "KUBECONFIG": str(self.kubeconfig), **self.env}
        with (self.workdir / f"operator-{self.starts}.log").open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kubedistill.handlers", "-n", self.namespace],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies under the operator."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("operator-*.log")))
