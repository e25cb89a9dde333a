"""HTTP/2 frames built by hand (RFC 9113 section 4.1), for tests that must not trust the code
under test to produce or parse them."""

from __future__ import annotations


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes([ftype, flags])
        + (stream_id & 0x7FFFFFFF).to_bytes(4, "big")
        + payload
    )
