"""Errors of the HTTP layer; each carries the status a client should see and Envoy's
response flag for telemetry."""

from __future__ import annotations

from ztunnel.errors import ZtunnelError


class HttpError(ZtunnelError):
    """A request cannot be served: `status` goes to the client, `flag` to telemetry."""

    def __init__(self, status: int, message: str, flag: str = "-") -> None:
        self.status = status
        self.flag = flag
        super().__init__(message)


class ProtocolError(HttpError):
    """The peer broke HTTP (malformed, oversized, smuggling attempt): answer and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message, "DPE")


class UpstreamError(ZtunnelError):
    """The upstream failed before or while answering; `kind` says how (for retryOn):
    connect-failure, reset, refused-stream, timeout, overflow."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)
