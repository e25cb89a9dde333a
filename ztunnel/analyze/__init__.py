"""`ztunnel analyze`: configuration mistakes found before they bite, in `istioctl analyze`'s
words (Istio's codes, names and message texts; its output, ordering and exit codes). Built on
the shared config model (`ztunnel.meshconfig`): resources are parsed once, there.

Rooms, bottom to top:
- `messages`: levels, message types (codes and templates from Istio's messages.yaml), the
  resource a message is about (`Kind ns/name file:line`), Go's formatting, istioctl's order.
- `context`: what analyzers get (the `ConfigSet`, the kinds available, `report`) and the
  `Analyzer` record.
- `registry`, `mesh`: Istio's service-registry lookup; mesh membership and waypoint binding
  as istiod decides them.
- analyzer families, pure (ConfigSet in, messages out): `virtualservice`, `destinationrule`,
  `service`, `authz`, `ambient`, `schema`, `conditions`.
- `engine`: which analyzers run, filtering (namespace, suppressions), sorting, dedup.
- `sources` (files, stdin, overlay) and `kube` (the cluster through the Kubernetes client).
- `output` (log/json/yaml, summary lines) and `command` (the CLI adapter, exit codes).
"""
