"""Istio's standard TCP traffic labels (shared/WIRE.md, Telemetry) computed from a
`ConnectionRecord`. Pure: a record in, a hashable label tuple out."""

from __future__ import annotations

from typing import NamedTuple

from ztunnel.identity import SpiffeId
from ztunnel.model import Workload
from ztunnel.proxy.records import ConnectionRecord

UNKNOWN = "unknown"


class TrafficLabels(NamedTuple):
    """The label set of every `istio_tcp_*` series, in Istio's order.

    A NamedTuple so that it is hashable (the key of a series) and cheap to build once per
    connection; `label_names()` gives the names in the same order as the values.
    """

    reporter: str
    source_workload: str
    source_canonical_service: str
    source_canonical_revision: str
    source_workload_namespace: str
    source_principal: str
    source_app: str
    source_version: str
    source_cluster: str
    destination_service: str
    destination_service_namespace: str
    destination_service_name: str
    destination_workload: str
    destination_canonical_service: str
    destination_canonical_revision: str
    destination_workload_namespace: str
    destination_principal: str
    destination_app: str
    destination_version: str
    destination_cluster: str
    request_protocol: str
    response_flags: str
    connection_security_policy: str

    @classmethod
    def label_names(cls) -> tuple[str, ...]:
        return cls._fields


def _or_unknown(value: str | None) -> str:
    return value if value else UNKNOWN


def reporter_of(record: ConnectionRecord) -> str:
    """The sending agent reports `source` (outbound records), the receiving one `destination`."""
    return "source" if record.direction == "outbound" else "destination"


def _workload_labels(wl: Workload | None) -> tuple[str, str, str, str, str, str, str]:
    """workload, canonical service, canonical revision, namespace, app, version, cluster."""
    if wl is None:
        return (UNKNOWN,) * 7
    # Istio reports the owning workload's name (a Deployment's), the pod name only as fallback;
    # `app`/`revision` already fall back the way istiod fills canonical_name/revision.
    return (
        _or_unknown(wl.workload_name or wl.name),
        _or_unknown(wl.app),
        _or_unknown(wl.revision),
        _or_unknown(wl.namespace),
        _or_unknown(wl.app),
        _or_unknown(wl.revision),
        _or_unknown(wl.cluster_id),
    )


def _principal(identity: SpiffeId | None) -> str:
    # Istio's principal labels carry the full SPIFFE URI (spiffe://td/ns/N/sa/S).
    return identity.uri if identity is not None else UNKNOWN


def traffic_labels(record: ConnectionRecord) -> TrafficLabels:
    """The labels of `record` as they stand now (response_flags included)."""
    src = _workload_labels(record.src_workload)
    dst = _workload_labels(record.dst_workload)
    svc = record.dst_service
    # The source principal is only ever the identity the record was given: on the inbound side
    # that is the peer certificate's, never one guessed from the client's IP address.
    src_principal = _principal(record.src_identity)
    dst_identity = record.dst_identity
    if dst_identity is None and record.dst_workload is not None:
        dst_identity = record.dst_workload.identity
    return TrafficLabels(
        reporter=reporter_of(record),
        source_workload=src[0],
        source_canonical_service=src[1],
        source_canonical_revision=src[2],
        source_workload_namespace=src[3],
        source_principal=src_principal,
        source_app=src[4],
        source_version=src[5],
        source_cluster=src[6],
        destination_service=_or_unknown(svc.hostname if svc else None),
        destination_service_namespace=_or_unknown(svc.namespace if svc else None),
        destination_service_name=_or_unknown(svc.name if svc else None),
        destination_workload=dst[0],
        destination_canonical_service=dst[1],
        destination_canonical_revision=dst[2],
        destination_workload_namespace=dst[3],
        destination_principal=_principal(dst_identity),
        destination_app=dst[4],
        destination_version=dst[5],
        destination_cluster=dst[6],
        request_protocol="tcp",
        response_flags=record.response_flag or "-",
        connection_security_policy="mutual_tls" if record.mtls else UNKNOWN,
    )
