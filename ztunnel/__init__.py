"""ztunnel: the node agent of a sidecar-less, Istio-ambient-compatible service mesh.

Where things are, bottom to top:
- core, no I/O: `model` (workloads, services), `identity` (SPIFFE ids), `state` (indexed mesh
  snapshot), `localconfig` (the YAML mesh-state file, read through `safeyaml`'s bounds),
  `config` (agent settings), `authz` (L4 authorization), `hbone.protocol`/`hbone.headers`
  (HTTP/2 CONNECT), `hbone.limits` (HTTP/2 abuse limits), `admission` (connection and
  handshake caps), `proxy.routing`.
- certificates: `ca` (built-in CA), `certs` (certificate sources, cache and renewal),
  `hbone.tls` (TLS contexts and SPIFFE peer checks).
- I/O: `hbone.connection`/`hbone.pool`/`hbone.server` (HBONE over asyncio), `proxy.*`
  (outbound, inbound, SOCKS5, relay), `capture` (eBPF via bcc + pyroute2).
- composition root and commands: `app` (the Agent), `cli`, `demo`, `lab`.
"""

__version__ = "0.1.0"
