"""Test support. The control plane on loopback and the local kubelet (like envtest / kopf.testing):

- :mod:`kubedistill_testing.cluster` builds etcd, kube-apiserver and kube-controller-manager from the
  Go modules once per machine and starts them on free loopback ports.
- :mod:`kubedistill_testing.kubelet` registers one Node, binds Pods that fit and runs their containers
  as local processes, writing Pod status back so the real Job controller can do its work.
"""
