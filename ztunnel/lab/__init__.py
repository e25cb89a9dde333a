"""The network-namespace lab: nodes and pods built from namespaces and veths on one machine.

`topology` builds, describes and tears down labs; kernel-level tests and `ztunnel lab up/down`
use it. Nothing here is on the agent's data path.
"""
