"""ztunnel: the node agent of a sidecar-less, Istio-ambient-compatible service mesh.

Where things are, bottom to top:
- core, no I/O: `model` (workloads, services), `identity` (SPIFFE ids), `state` (indexed mesh
  snapshot), `localconfig` (the YAML mesh-state file, read through `safeyaml`'s bounds),
  `config` (agent settings), `authz` (L4 authorization), `hbone.protocol`/`hbone.headers`
  (HTTP/2 CONNECT), `hbone.limits` (HTTP/2 abuse limits), `admission` (connection and
  handshake caps), `proxy.routing`, `meshconfig` (Istio/Gateway API traffic and L7 policy
  resources, compiled; waypoint, analyze).
- certificates: `ca` (built-in CA), `certs` (certificate sources, cache and renewal),
  `istioca` (Istio's CA as a certificate source), `hbone.tls` (TLS contexts and SPIFFE
  peer checks).
- istiod: `xds` (delta xDS: proto conversion and the ADS state machine without I/O, the grpcio
  client, generated protobuf code in `xds.gen`).
- I/O: `hbone.connection`/`hbone.pool`/`hbone.server` (HBONE over asyncio), `proxy.*`
  (outbound, inbound, SOCKS5, relay), `capture` (eBPF via bcc + pyroute2), `kernel_capture`
  (the agent's side of it: enrolment API, periodic hook checks), `capture_report` (what the
  checks found: metrics, readiness, `ctl capture`).
- composition root and commands: `app` (the Agent), `cli`, `demo`, `lab`, `analyze`
  (istioctl-style configuration analysis on `meshconfig`).
"""

__version__ = "0.1.0"
