"""A local kubelet: one Node whose Pods run as processes on this machine.

It does what the control plane needs from a kubelet and a scheduler:

- registers one Node with a configurable capacity (``nvidia.com/gpu`` defaults to 0) at 127.0.0.1;
- binds unscheduled Pods that fit (node selector, resource requests); a Pod that does not fit stays
  Pending with ``PodScheduled=False``, reason ``Unschedulable`` and the scheduler's message, e.g.
  ``0/1 nodes are available: 1 Insufficient nvidia.com/gpu.`` (:mod:`.scheduling`);
- gives each Pod an address of its own (:mod:`.addresses`): ``status.podIP`` is ``198.18.b.c`` and its
  processes bind ``127.18.b.c``, which is what ``fieldRef: status.podIP`` reads as inside the Pod;
- runs each container as a process in its own process group. ``command`` + ``args`` run as given, except
  that ``python``/``python3`` mean this interpreter (as an image's python is the image's own environment).
  A container without ``command`` runs the argv prefix mapped to the longest matching image prefix
  (``images``), followed by its ``args``. An unmapped image leaves the container waiting with
  ``ErrImageNeverPull``;
- builds the environment a kubelet would: ``env`` (with ``$(VAR)`` expansion), ``envFrom``, and
  ``valueFrom`` secretKeyRef / configMapKeyRef / fieldRef read from the API;
- gives each Pod its ServiceAccount's identity: a token from the TokenRequest API bound to the Pod, the
  cluster CA and the namespace in a per-pod directory named by ``KUBEDISTILL_SERVICEACCOUNT_DIR``, and
  ``KUBERNETES_SERVICE_HOST``/``PORT`` pointing at the API server. (A real kubelet mounts the same three
  files at /var/run/secrets/kubernetes.io/serviceaccount; local processes cannot see that path.)
- maps ``terminationMessagePath`` to a per-container file named by ``KUBEDISTILL_TERMINATION_LOG``: stage
  programs write their termination message there when that variable is set;
- runs init containers in order, each to completion, before the containers; a failed one is retried
  with back-off, or with ``restartPolicy: Never`` fails the Pod (:mod:`.worker`);
- runs startup, readiness and liveness probes (``httpGet``, ``tcpSocket``, ``exec``) with their timing
  and thresholds (:mod:`.probes`): ``started``, ``ready`` and the Pod's ``Ready``/``ContainersReady``
  conditions follow them, so the EndpointSlice controller sees what it would on a node; a failed startup
  or liveness probe stops the container, which is then restarted per ``restartPolicy``;
- restarts containers per ``restartPolicy`` (Always, OnFailure) with the kubelet's doubling back-off,
  ``restartCount``, ``lastState`` and the waiting reason ``CrashLoopBackOff``;
- records the Events a node's kubelet does for these: Unhealthy, Killing, BackOff, FailedPreStopHook;
- writes Pod status (phase, conditions, container states with exit code, reason, termination message,
  start/finish times) so the real Job and Deployment controllers do their work;
- keeps each container's output in ``log_path(namespace, pod, container)`` (the previous run's beside it)
  and serves it on the kubelet API (:mod:`.logs`), so ``kubectl logs`` works through the API server;
- on Pod deletion runs each container's ``preStop`` hook, sends SIGTERM, waits out the grace period
  (capped at ``max_grace_seconds``), SIGKILLs the process group, reports the Pod Failed and only then
  removes it, as a kubelet finishes a graceful delete.

- makes each ``emptyDir`` volume a per-pod directory, shared by the Pod's init containers and containers
  and removed when the Pod is deleted, and writes each ``configMap`` volume (its ``items``, else every
  key) into one. Local processes cannot see a mount path itself, so every env value, ``command``/``args``
  token (also the value of ``--name=value``) and ``workingDir`` at or under a container's ``mountPath``
  points at the volume's directory (the deepest mount wins); with a volume at /tmp, ``TMPDIR`` names it.

- runs each container process in a private mount namespace (:mod:`.mounts`) that sees a per-pod hosts
  file as /etc/hosts, rewritten in place as Pods and Services change, with the names cluster DNS would
  answer (:mod:`.hosts`): the Pod's own hostname, ``<hostname>.<svc>[.<ns>[.svc[.cluster.local]]]`` for the
  named Pods of headless Services, and ``<svc>[.<ns>[.svc[.cluster.local]]]`` → the loopback address of a
  Service's ClusterIP (``service_loopback_address``: 10.0.0.c → 127.10.0.c). Where ``unshare`` cannot make
  the namespace, containers run without it (``LocalKubelet.namespace_problem`` says why, logged once).

Other volumes, hostNetwork, other security context fields, sidecar init containers and postStart hooks
are ignored.
"""

from kubedistill_testing.kubelet.addresses import loopback_address, service_loopback_address
from kubedistill_testing.kubelet.containers import (
    ConfigError,
    ContainerState,
    configmap_volume_files,
    container_env,
    exit_code,
    expand_vars,
    pod_phase,
    remap_path,
    remap_paths,
    resolve_argv,
    termination_message,
)
from kubedistill_testing.kubelet.node import LocalKubelet
from kubedistill_testing.kubelet.scheduling import (
    insufficient,
    pod_requests,
    selector_matches,
    unschedulable_message,
)

__all__ = [
    "ConfigError",
    "ContainerState",
    "LocalKubelet",
    "configmap_volume_files",
    "container_env",
    "exit_code",
    "expand_vars",
    "insufficient",
    "loopback_address",
    "pod_phase",
    "pod_requests",
    "remap_path",
    "remap_paths",
    "resolve_argv",
    "selector_matches",
    "service_loopback_address",
    "termination_message",
    "unschedulable_message",
]
