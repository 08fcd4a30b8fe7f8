"""One Pod's life on the node: init containers in order, then the containers with their probes and
restarts, then a graceful stop when the Pod is deleted."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubernetes.client.exceptions import ApiException

from kubedistill_testing.kubelet.addresses import loopback_address
from kubedistill_testing.kubelet.containers import (
    FALLBACK_LOG_BYTES,
    MAX_TERMINATION_MESSAGE,
    TERMINAL,
    ConfigError,
    ContainerState,
    configmap_volume_files,
    container_env,
    crash_loop_message,
    exit_code,
    now,
    pod_phase,
    pod_status,
    remap_path,
    remap_paths,
    resolve_argv,
    restart_delay,
    should_restart,
    termination_message,
)
from kubedistill_testing.kubelet.logs import previous_path, read_head, read_tail
from kubedistill_testing.kubelet.mounts import in_namespace
from kubedistill_testing.kubelet.probes import Action, Probe, Prober, Target, handler_action, run_action

if TYPE_CHECKING:
    from kubedistill_testing.kubelet.node import LocalKubelet

log = logging.getLogger(__name__)

Pod = dict[str, Any]
PROBE_KINDS = ("startup", "readiness", "liveness")
# After a preStop hook has used up the grace period the kubelet still allows this much for SIGTERM.
MIN_GRACE_AFTER_HOOK_S = 2.0
DEFAULT_GRACE_S = 30.0


@dataclass(frozen=True)
class Prepared:
    """Everything a container needs to start, resolved once per Pod."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    termination_file: Path
    message_policy: str
    probes: Mapping[str, Probe]
    pre_stop: Action | None


@dataclass
class _Running:
    state: ContainerState
    proc: subprocess.Popen[bytes] | None  # None: the process could not be started
    prepared: Prepared
    log_file: Path
    started: float = field(default_factory=time.monotonic)
    probers: dict[str, Prober] = field(default_factory=dict)
    stopping: bool = False


class PodWorker(threading.Thread):
    """Runs one Pod: init containers in order, then all containers, then the final status."""

    def __init__(self, kubelet: LocalKubelet, pod: Pod, pod_ip: str) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.kubelet = kubelet
        self.pod = pod
        self.pod_ip = pod_ip
        self.local_ip = loopback_address(pod_ip)
        self.dir = kubelet.root / "pods" / meta["uid"]
        # Written by the kubelet's loop thread before the worker starts and whenever names change.
        self.hosts_file = self.dir / "etc-hosts"
        self.hosts_content: str | None = None
        self.restart_policy = pod["spec"].get("restartPolicy", "Always")
        init_specs = pod["spec"].get("initContainers") or []
        self.init = [ContainerState(c["name"], c.get("image", "")) for c in init_specs]
        self.main = [ContainerState(c["name"], c.get("image", "")) for c in pod["spec"]["containers"]]
        if self.init:
            for state in [*self.init, *self.main]:
                state.state = {"waiting": {"reason": "PodInitializing"}}
        self.started_at = now()
        grace = pod["spec"].get("terminationGracePeriodSeconds")
        self.termination_grace = float(DEFAULT_GRACE_S if grace is None else grace)
        self._killed = threading.Event()
        self._grace = 0.0
        self._report = True
        self._runs: dict[str, _Running] = {}
        self._crashes: dict[str, int] = {}
        self._last_status: dict[str, Any] | None = None

    def kill(self, grace: float, report: bool) -> None:
        self._grace = grace
        self._report = self._report and report
        self._killed.set()

    def pids(self) -> list[int]:
        return [r.proc.pid for r in list(self._runs.values()) if r.proc is not None and r.proc.poll() is None]

    def is_running(self, container: str) -> bool:
        run = self._runs.get(container)
        return run is not None and run.proc is not None and run.proc.poll() is None

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("local kubelet: pod %s failed unexpectedly", self.name)
        finally:
            self._stop_all([r for r in self._runs.values() if r.proc and r.proc.poll() is None], 0)
            self.kubelet._events.put(("worker-done", self.pod["metadata"]["uid"]))

    # -- phases ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        self._push()
        prepared = self._prepare()
        if prepared is None:
            return self._finish_deleted()
        for state in self.init:
            if not self._run_group([state], prepared) or self._killed.is_set():
                break
        else:
            self._run_group(self.main, prepared)
        if self._killed.is_set():
            return self._finish_deleted()
        self._push()

    def _prepare(self) -> dict[str, Prepared] | None:
        """Per container; retried every second while config is missing, as a kubelet does."""
        while not self._killed.is_set():
            try:
                return self._resolve()
            except ConfigError as err:
                for state in [*self.init, *self.main]:
                    state.state = {"waiting": {"reason": err.reason, "message": err.message}}
                self._push()
            except ApiException as err:
                log.warning("local kubelet: preparing %s: %s", self.name, err.reason)
            self._killed.wait(1.0)
        return None

    def _resolve(self) -> dict[str, Prepared]:
        kubelet, meta = self.kubelet, self.pod["metadata"]
        base = {
            **kubelet.base_env,
            "HOSTNAME": meta["name"],
            "KUBERNETES_SERVICE_HOST": kubelet.api_host,
            "KUBERNETES_SERVICE_PORT": str(kubelet.api_port),
        }
        # Inside the Pod its own address is the loopback one its processes can bind (see addresses.py).
        local_view = {**self.pod, "status": {**self.pod.get("status", {}), "podIP": self.local_ip}}
        account_dir = kubelet._service_account_dir(self.pod, self.dir / "serviceaccount")
        volumes = self._volumes()
        resolved = {}
        for container in [*(self.pod["spec"].get("initContainers") or []), *self.pod["spec"]["containers"]]:
            mounts = {
                m["mountPath"]: volumes[m["name"]]
                for m in container.get("volumeMounts") or []
                if m["name"] in volumes
            }
            seen = container_env(local_view, container, kubelet._lookup, base)
            if "/tmp" in mounts:  # the process's temporary files go where its /tmp is, as in the image
                seen.setdefault("TMPDIR", "/tmp")
            env = remap_paths(seen, mounts)
            if account_dir:
                env["KUBEDISTILL_SERVICEACCOUNT_DIR"] = str(account_dir)
            termination_file = self.dir / container["name"] / "termination-log"
            env["KUBEDISTILL_TERMINATION_LOG"] = str(termination_file)
            workdir = remap_path(container["workingDir"], mounts) if container.get("workingDir") else None
            pre_stop = (container.get("lifecycle") or {}).get("preStop")
            resolved[container["name"]] = Prepared(
                argv=resolve_argv(container, seen, kubelet.images, kubelet.commands, mounts),
                env=env,
                cwd=workdir if workdir and Path(workdir).is_dir() else str(termination_file.parent),
                termination_file=termination_file,
                message_policy=container.get("terminationMessagePolicy", "File"),
                probes={
                    kind: Probe.from_spec(container[f"{kind}Probe"], container)
                    for kind in PROBE_KINDS
                    if container.get(f"{kind}Probe")
                },
                pre_stop=handler_action(pre_stop, container) if pre_stop else None,
            )
        return resolved

    def _volumes(self) -> dict[str, Path]:
        """Make the Pod's volumes under its directory; volume name → local directory.

        An emptyDir is one directory that the Pod's init containers and containers share, removed with the
        Pod (:meth:`LocalKubelet._remove_pod_dir`); a configMap volume holds its keys as files."""
        namespace = self.pod["metadata"]["namespace"]
        made = {}
        for volume in self.pod["spec"].get("volumes") or []:
            directory = self.dir / "volumes" / volume["name"]
            if "emptyDir" in volume:
                directory.mkdir(parents=True, exist_ok=True)
                made[volume["name"]] = directory
                continue
            source = volume.get("configMap")
            if source is None:
                continue
            data = self.kubelet._lookup("configmap", namespace, source["name"])
            if data is None and not source.get("optional"):
                raise ConfigError("CreateContainerConfigError", f'configmap "{source["name"]}" not found')
            for relative, content in configmap_volume_files(source, data or {}).items():
                path = directory / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content, encoding="utf-8")
            directory.mkdir(parents=True, exist_ok=True)
            made[volume["name"]] = directory
        return made

    def _run_group(self, states: Sequence[ContainerState], prepared: Mapping[str, Prepared]) -> bool:
        """Run containers together until all are done for good (or the Pod is deleted); True if all exit 0."""
        is_init = states is not self.main
        # Init containers are retried unless the Pod never restarts; Always means OnFailure for them.
        policy = (
            ("Never" if self.restart_policy == "Never" else "OnFailure") if is_init else self.restart_policy
        )
        running = {s.name: self._start(s, prepared[s.name]) for s in states}
        self._push()
        restart_at: dict[str, float] = {}
        while (running or restart_at) and not self._killed.is_set():
            for name, run in list(running.items()):
                if run.proc is not None and run.proc.poll() is None:
                    self._follow_probes(run)
                    continue
                del running[name]
                code = self._record_exit(run)
                if should_restart(policy, code):
                    restart_at[name] = time.monotonic() + self._back_off(run)
            for name, when in list(restart_at.items()):
                if time.monotonic() >= when:
                    del restart_at[name]
                    state = next(s for s in states if s.name == name)
                    state.restart_count += 1
                    running[name] = self._start(state, prepared[name])
            self._push()
            self._killed.wait(0.05)
        if self._killed.is_set():
            self._stop_all(list(running.values()), self._grace)
            for run in running.values():
                self._record_exit(run)
            return False
        return all(s.kind == "terminated" and s.exit_code() == 0 for s in states)

    def _back_off(self, run: _Running) -> float:
        """Wait in CrashLoopBackOff; a run that lasted twice the cap starts the doubling again."""
        kubelet, name = self.kubelet, run.state.name
        long_run = time.monotonic() - run.started >= 2 * kubelet.backoff_max_s
        crashes = 1 if long_run else self._crashes.get(name, 0) + 1
        self._crashes[name] = crashes
        delay = restart_delay(crashes, kubelet.backoff_base_s, kubelet.backoff_max_s)
        run.state.last_state = dict(run.state.state)
        message = crash_loop_message(delay, name, self.pod)
        run.state.state = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
        meta = self.pod["metadata"]
        self._event(name, "Warning", "BackOff",
                    f"Back-off restarting failed container {name} in pod {meta['name']}_{meta['namespace']}({meta['uid']})")  # fmt: skip
        return delay

    def _follow_probes(self, run: _Running) -> None:
        """Started and ready follow the probes; a failed startup or liveness probe stops the container."""
        state, probers = run.state, run.probers
        startup = probers.get("startup")
        state.started = startup is None or startup.passed.is_set()
        readiness = probers.get("readiness")
        state.ready = state.started and (readiness is None or readiness.result is True)
        failed = next((p for p in probers.values() if p.kind != "readiness" and p.result is False), None)
        if failed is None or run.stopping:
            return
        run.stopping = True
        self._event(
            state.name,
            "Normal",
            "Killing",
            f"Container {state.name} failed {failed.kind} probe, will be restarted",
        )
        grace = min(self.termination_grace, self.kubelet.max_grace_seconds)
        threading.Thread(target=self._stop_container, args=(run, grace), daemon=True).start()

    def _start(self, state: ContainerState, prepared: Prepared) -> _Running:
        meta = self.pod["metadata"]
        log_file = self.kubelet.log_path(meta["namespace"], meta["name"], state.name)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        if state.restart_count:
            with contextlib.suppress(FileNotFoundError):
                os.replace(log_file, previous_path(log_file))
        else:  # a new Pod: nothing of an earlier Pod with the same name is its previous run
            previous_path(log_file).unlink(missing_ok=True)
        prepared.termination_file.parent.mkdir(parents=True, exist_ok=True)
        prepared.termination_file.write_text("")
        started = now()
        try:
            argv = self._process_argv(prepared)
            with log_file.open("wb") as out:
                proc = subprocess.Popen(
                    argv, env=prepared.env, cwd=prepared.cwd, stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
        except OSError as err:
            # What a runtime reports when the entrypoint cannot be executed.
            state.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": str(err),
                                          "startedAt": started, "finishedAt": now()}}  # fmt: skip
            return _Running(state, None, prepared, log_file)
        state.pid = proc.pid
        state.state = {"running": {"startedAt": started}}
        run = _Running(state, proc, prepared, log_file)
        self._runs[state.name] = run
        target = Target(self.local_ip, prepared.env, prepared.cwd, self.kubelet.commands)

        def unhealthy(message: str) -> None:
            self._event(state.name, "Warning", "Unhealthy", message)

        startup = prepared.probes.get("startup")
        gate = None
        if startup is not None:
            run.probers["startup"] = Prober("startup", startup, target, name=state.name, on_failure=unhealthy)
            gate = run.probers["startup"].passed
        for kind in ("readiness", "liveness"):
            if kind in prepared.probes:
                run.probers[kind] = Prober(
                    kind, prepared.probes[kind], target, gate=gate, name=state.name, on_failure=unhealthy
                )
        for prober in run.probers.values():
            prober.start()
        self._follow_probes(run)
        return run

    def _process_argv(self, prepared: Prepared) -> list[str]:
        """The container's argv, in the Pod's mount namespace where the node can make one."""
        unshare = self.kubelet.unshare
        if unshare is None:
            return prepared.argv
        # Found first, so that a missing entrypoint is a StartError here too, not the shell's exit 127.
        if shutil.which(prepared.argv[0], path=prepared.env.get("PATH", os.defpath)) is None:
            raise FileNotFoundError(errno.ENOENT, "executable file not found in $PATH", prepared.argv[0])
        return in_namespace(unshare, prepared.argv, self.hosts_file)

    def _record_exit(self, run: _Running) -> int:
        for prober in run.probers.values():
            prober.stop()
        run.state.started = run.state.ready = False
        if run.proc is None:  # StartError: recorded when it happened
            return int(run.state.state["terminated"]["exitCode"])
        code = exit_code(run.proc.wait())
        written = read_head(run.prepared.termination_file, MAX_TERMINATION_MESSAGE)
        log_tail = read_tail(run.log_file, FALLBACK_LOG_BYTES * 4) if not written and code else ""
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": run.state.state.get("running", {}).get("startedAt", self.started_at),
            "finishedAt": now(),
            "containerID": f"local://{run.state.pid}",
        }
        message = termination_message(written, log_tail, run.prepared.message_policy, code)
        if message:
            terminated["message"] = message
        run.state.state = {"terminated": terminated}
        return code

    # -- stopping -------------------------------------------------------------------------------------

    def _stop_all(self, runs: Sequence[_Running], grace: float) -> None:
        """Stop containers in parallel, each with its own preStop hook and the same grace period."""
        threads = [threading.Thread(target=self._stop_container, args=(r, grace), daemon=True) for r in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _stop_container(self, run: _Running, grace: float) -> None:
        """preStop hook, SIGTERM, the rest of the grace period, then SIGKILL for the whole process group."""
        proc = run.proc
        if proc is None or proc.poll() is not None:
            return
        deadline = time.monotonic() + grace
        if grace > 0 and run.prepared.pre_stop is not None:
            target = Target(self.local_ip, run.prepared.env, run.prepared.cwd, self.kubelet.commands)
            ok, why = run_action(run.prepared.pre_stop, target, grace)
            if not ok:
                self._event(run.state.name, "Warning", "FailedPreStopHook", f"PreStopHook failed: {why}")
            deadline = max(deadline, time.monotonic() + MIN_GRACE_AFTER_HOOK_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def _event(self, container: str, kind: str, reason: str, message: str) -> None:
        self.kubelet._record_event(self.pod, container, kind, reason, message)

    def _finish_deleted(self) -> None:
        """A Pod deleted while it ran ends Failed (as on a kubelet since 1.27), then its object is removed."""
        if not self._report:
            return
        phase = pod_phase(self.init, self.main, self.restart_policy)
        for state in [*self.init, *self.main]:
            if state.kind != "terminated":
                state.state = {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                              "message": "The container was stopped because the pod was deleted",
                                              "startedAt": self.started_at, "finishedAt": now()}}  # fmt: skip
        self._push(phase=phase if phase in TERMINAL else "Failed")
        meta = self.pod["metadata"]
        self.kubelet._delete_now(meta["namespace"], meta["name"], meta["uid"])

    def _push(self, phase: str | None = None) -> None:
        phase = phase or pod_phase(self.init, self.main, self.restart_policy)
        status = pod_status(phase, self.init, self.main, self.started_at, self.pod_ip)
        comparable = {**status, "conditions": [{**c, "lastTransitionTime": ""} for c in status["conditions"]]}
        if comparable == self._last_status:
            return
        self._last_status = comparable
        self.kubelet._patch_status(self.pod, status)
