"""`ztunnel bench`: the data path measured against plain TCP and a C TLS tunnel (stunnel), side by
side, in one run, in the namespace lab.

Where things are: `procstat` (CPU time and RSS of processes, the machine's description),
`tools` (the C load generator in `bench/loadgen.c`, iperf3, stunnel, the TPROXY rules of the
iptables-style capture), `labs` (the labs a run builds: no mesh, eBPF agents, TPROXY agents),
`suite` (scenarios x measurements, medians and ratios), `report` (terminal table, JSON, PNG
chart, the README section), `profile` (py-spy samples of the agents, optional).
"""
