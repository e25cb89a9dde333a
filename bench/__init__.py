"""The benchmarks: a development tool kept in the source tree, outside the agent's runtime package
(not in the wheel; it builds `loadgen.c`/`httpload.c` from here). `ztunnel bench` (or
`sudo bench/run.sh`) runs the suite: the data path measured against plain TCP and a C TLS tunnel
(stunnel), side by side, in one run, in the namespace lab.

Where things are: `command` (the `ztunnel bench` options and run), `suite` (scenarios x
measurements, medians and ratios), `labs` (the labs a run builds: no mesh, eBPF agents, TPROXY
agents), `tools` (the C load generator `loadgen.c`, iperf3, stunnel, the TPROXY rules of the
iptables-style capture), `procstat` (CPU time and RSS of processes, the machine's description),
`report` (terminal table, JSON, PNG chart, the README section), `profile` (py-spy samples of the
agents, optional), `l7` (waypoint vs nginx vs HAProxy, with `httpload.c`). Standalone
microbenchmarks: `authz_bench.py`, `hbone_bench.py`, `cni_add_bench.py`; results in `results/`.
"""
