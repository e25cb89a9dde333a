"""The error tree of the node agent: one root, and subclasses that carry what goes on the wire.

Foreign exceptions (ssl, h2, bcc, pyroute2, grpc) are translated into these at the boundary
that meets them, so callers only ever handle `ZtunnelError`.
"""

from __future__ import annotations


class ZtunnelError(Exception):
    """Root of every error the agent raises on purpose."""


class ConfigError(ZtunnelError):
    """Bad configuration; `source` names the file or flag, `path` the field inside it."""

    def __init__(self, source: str, path: str, reason: str) -> None:
        self.source = source
        self.path = path
        self.reason = reason
        where = f"{source}: {path}" if path else source
        super().__init__(f"{where}: {reason}")


class IdentityError(ZtunnelError):
    """A SPIFFE identity could not be parsed, or a certificate is not acceptable."""


class CertificateError(ZtunnelError):
    """A certificate could not be obtained from the configured source."""


class HboneError(ZtunnelError):
    """An HBONE tunnel failed; `status` is the HTTP status that describes it (0 if none)."""

    def __init__(self, message: str, status: int = 0) -> None:
        self.status = status
        super().__init__(message)


class ConnectRejected(HboneError):
    """The peer answered the CONNECT with a non-200 status."""


class ProxyError(ZtunnelError):
    """A proxied connection could not be set up; `response_flag` is Istio's telemetry flag."""

    def __init__(self, message: str, response_flag: str = "CONNECT") -> None:
        self.response_flag = response_flag
        # The connection record as far as it got (set by the outbound proxy), for telemetry.
        self.record: object | None = None
        super().__init__(message)
