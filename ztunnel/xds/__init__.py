"""istiod as a source of mesh state: delta xDS over grpcio.

- `gen/`: Python generated from our `.proto` restatements in `proto/` (`protogen` regenerates
  it; never edit by hand).
- `convert`: xDS resources <-> model records (`Workload`, `Service`, `AuthorizationPolicy`),
  no I/O; errors per resource.
- `ads`: the delta ADS client state machine (subscriptions, nonces, ACK/NACK, removals,
  `initial_resource_versions`), no I/O.
- `config`: addresses, root certificates, token, node id and metadata, as Istio's ztunnel reads
  them.
- `client`: the grpcio asyncio adapter that keeps the stream to istiod and feeds the
  `WorkloadStore`; `control`: xDS client + Istio CA source (`ztunnel.istioca`) for the agent.

The test istiod that speaks the server side lives in `ztunnel.lab.istiod`.
"""
