"""The network-namespace lab: nodes and pods built from namespaces and veths on one machine.

`topology` builds, describes and tears down labs; kernel-level tests and `ztunnel lab up/down`
use it. `runner` starts agents and apps, `demo` sends every kind of flow. `istiod` is a test
istiod (delta xDS + CA server, a stand-in for tests and the lab) and `istiod_lab` runs it
inside a lab. The Kubernetes mode: `kubeapi` (the API server stand-in, reusable on its own;
what it serves, incl. CRDs, in `kuberesources`, its patch formats in `kubepatch`, both pure),
`meshgen` (API objects -> mesh state, as istiod derives it; pure), `k8s` (the cluster: CNI
runtime and kubelet stand-ins, installers, controllers) and `k8sdemo` (its story). `image` runs
the lab's node processes from the OCI image with podman (`lab up|demo --image`); `machines`
(`machine_cli`: `lab machine up|demo`) spreads a lab over machines, one node each, around a
real NIC (the two Vagrant VMs). Nothing here is on the agent's data path.
"""
