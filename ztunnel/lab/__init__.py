"""The network-namespace lab: nodes and pods built from namespaces and veths on one machine.

`topology` builds, describes and tears down labs; kernel-level tests and `ztunnel lab up/down`
use it. `istiod` is a test istiod (delta xDS + CA server, a stand-in for tests and the lab) and
`istiod_lab` runs it inside a lab. Nothing here is on the agent's data path.
"""
