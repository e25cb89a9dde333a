"""The access log: one "connection complete" line per finished connection, with the fields of
Istio's ztunnel (shared/WIRE.md, Telemetry), on the logger `ztunnel.access`.

Fields travel as logging `extra`s, so the JSON formatter (LOG_FORMAT=json) emits each as its
own key and the text formatter appends them as `key=value`. `access_fields` is pure.
"""

from __future__ import annotations

import json
import logging

from ztunnel.proxy.records import ConnectionRecord

ACCESS_LOGGER = "ztunnel.access"

FieldValue = str | int


class LogText(str):
    """A string field that quotes itself when formatted into a text line and would otherwise
    be ambiguous (spaces, quotes, `=`), e.g. an error message; JSON sees the plain string."""

    __slots__ = ()

    def __format__(self, spec: str) -> str:
        plain = str.__str__(self)
        if plain and not any(c in plain for c in ' "=\\\t\n'):
            return plain
        return json.dumps(plain)


def _hostport(addr: tuple[str, int]) -> str:
    ip, port = addr
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def access_fields(record: ConnectionRecord) -> dict[str, FieldValue]:
    """The access-log fields of `record`; fields without a value are left out (as ztunnel does).

    - `dst.addr` is the address the connection was actually made to and `dst.hbone_addr` the
      HBONE `:authority` inside the tunnel: on the outbound side of a tunnel these are the next
      hop (peer or waypoint, port 15008) and the original destination.
    - `bytes_sent`/`bytes_recv` follow ztunnel: the bytes this agent sent to / received from
      the other end of the mesh hop. Outbound that is the request / the response direction;
      inbound it is the other way round (the response goes out, the request comes in).
    - Identities appear only on mutual-TLS connections; `duration` is in milliseconds
      (`"12ms"`, ztunnel's rendering).
    """
    out: dict[str, FieldValue] = {"src.addr": _hostport(record.src)}
    src, dst, svc = record.src_workload, record.dst_workload, record.dst_service
    if src is not None:
        out["src.workload"] = LogText(src.name)
        out["src.namespace"] = LogText(src.namespace)
    if record.mtls and record.src_identity is not None:
        out["src.identity"] = LogText(record.src_identity.uri)
    if record.direction == "outbound" and record.hbone_target:
        out["dst.addr"] = LogText(record.hbone_target)
        out["dst.hbone_addr"] = _hostport(record.dst)
    else:
        out["dst.addr"] = _hostport(record.dst)
        if record.path == "hbone":
            out["dst.hbone_addr"] = _hostport(record.dst)
    if svc is not None:
        out["dst.service"] = LogText(svc.hostname)
    if dst is not None:
        out["dst.workload"] = LogText(dst.name)
        out["dst.namespace"] = LogText(dst.namespace)
    dst_identity = record.dst_identity or (dst.identity if dst is not None else None)
    if record.mtls and dst_identity is not None:
        out["dst.identity"] = LogText(dst_identity.uri)
    out["direction"] = record.direction
    if record.direction == "outbound":
        out["bytes_sent"], out["bytes_recv"] = record.bytes_sent, record.bytes_recv
    else:
        out["bytes_sent"], out["bytes_recv"] = record.bytes_recv, record.bytes_sent
    out["duration"] = f"{int(record.duration * 1000)}ms"
    if record.error:
        out["error"] = LogText(record.error)
    if record.response_flag and record.response_flag != "-":
        out["response_flags"] = record.response_flag
    return out


class AccessLog:
    """The access-log `Observer`: "connection opened" at debug, "connection complete" at info,
    or at warning with the error when the connection failed or ended in an error."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger(ACCESS_LOGGER)

    def opened(self, record: ConnectionRecord) -> None:
        # Records that failed before relaying are opened and closed at once; their one line
        # is the "connection complete" with the error.
        if record.error or not self.log.isEnabledFor(logging.DEBUG):
            return
        fields = access_fields(record)
        for key in ("bytes_sent", "bytes_recv", "duration"):
            fields.pop(key, None)
        self.log.debug("connection opened", extra=fields)

    def transferred(self, record: ConnectionRecord, sent: int, recv: int) -> None:
        pass

    def closed(self, record: ConnectionRecord) -> None:
        level = logging.WARNING if record.error else logging.INFO
        if self.log.isEnabledFor(level):
            self.log.log(level, "connection complete", extra=access_fields(record))
