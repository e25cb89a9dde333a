"""The network-namespace lab: nodes and pods built from namespaces and veths on one machine.

`topology` builds, describes and tears down labs; kernel-level tests and `ztunnel lab up/down`
use it. `istiod` is a test istiod (delta xDS + CA server, a stand-in for tests and the lab) and
`istiod_lab` runs it inside a lab. `image` runs the lab's node agents from the OCI image with
podman (`lab up|demo --image`); `machines` (`machine_cli`: `lab machine up|demo`) spreads a lab
over machines, one node each, around a real NIC (the two Vagrant VMs). Nothing here is on the
agent's data path.
"""
