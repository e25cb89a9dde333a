"""cni: Kubernetes ambient enrolment for the ztunnel node agent.

Where things are:
- `selection` (pure, stdlib, Python 3.9): a pod's labels/annotations and its namespace's
  labels in, "ambient or not, and why" out; Istio's defaults.
- `plugin` (stdlib only, Python 3.9: it runs on the host, launched by the container runtime):
  the chained CNI plugin `ztunnel-cni` (ADD/DEL/CHECK/VERSION/STATUS/GC).
- `reconcile` (pure): what the node controller must do, from the pods of its node, the
  namespaces and what the agent has enrolled.
- `controller`: the node enrolment controller; watches Kubernetes with the official client
  and applies `reconcile`'s actions through the agent's enrolment socket.
- `install`: `ztunnel-cni install`, run by the DaemonSet: plugin binary, kubeconfig, chain entry.
- `main`: the `ztunnel-cni` command (plugin when CNI_COMMAND is set, else subcommands).

Only `selection`, `plugin` and this file go to the host (as one zipapp); they must stay
importable by a bare Python 3.9 with nothing but the standard library.
"""
