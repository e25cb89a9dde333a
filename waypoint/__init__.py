"""waypoint: the L7 proxy of the mesh (Istio ambient's waypoint), in the same distribution as
the node agent, built on its core (HBONE, certificates, model, telemetry). Its configuration
model is `ztunnel.meshconfig`, shared with `ztunnel analyze`.

Rooms, bottom to top:
- no I/O: `router` (first-match routing, weights, rewrites, redirects, CORS), `balancer`
  (load balancing, consistent hashing, outlier detection, circuit-breaker counters), `authz`
  (L7 AuthorizationPolicy decisions), `state` (what this waypoint serves: bound services and
  workloads, compiled routes, endpoints), `config` (settings).
- HTTP: `http` (messages and bodies; HTTP/1.1 over h11 and HTTP/2/gRPC over h2, both sides,
  on any byte stream).
- I/O: `upstream` (pooled connections to endpoints with circuit breakers), `proxy` (the
  request path: policy, routing, faults, retries, timeouts, mirrors, telemetry), `server`
  (HBONE CONNECT in, protocol detection, TCP passthrough), `telemetry` (metrics, access
  log, tracing).
- composition root and command: `app` (the `Waypoint`), `cli` (`ztunnel-waypoint`,
  `ztunnel waypoint run`).
"""
