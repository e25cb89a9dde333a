"""Microbenchmark of the HBONE data path without sockets: DATA through a client/server pair of
`HboneProtocol` in memory (sender queues, receiver parses and returns the window), against
python-hyper h2 alone with the same settings as baseline, so the figure is the cost of our
layer (CONNECT handling, abuse limits, event translation) over h2's. Interleaved repetitions,
medians; every loop is bounded by a byte count.

    .venv/bin/python bench/hbone_bench.py [--mib 256] [--reps 5] [--chunk-kib 16 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import h2.config
import h2.connection
import h2.events
import h2.settings

from ztunnel.hbone import protocol as p
from ztunnel.hbone.headers import ConnectRequest

MiB = 1024 * 1024


def _raw_pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    conns = []
    for client in (True, False):
        c = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=client, header_encoding=None)
        )
        c.local_settings = h2.settings.Settings(
            client=client,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: p.STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: p.MAX_FRAME_SIZE,
            },
        )
        c.max_inbound_frame_size = p.MAX_FRAME_SIZE
        c.initiate_connection()
        c.increment_flow_control_window(p.CONNECTION_WINDOW - 65535)
        conns.append(c)
    return conns[0], conns[1]


def raw_h2(total: int, chunk: int) -> float:
    """Seconds to move `total` bytes client -> server with h2 alone."""
    c, s = _raw_pair()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")])
    s.receive_data(c.data_to_send())
    s.send_headers(sid, [(b":status", b"200")])
    c.receive_data(s.data_to_send())
    data = bytes(chunk)
    sent = 0
    t0 = time.perf_counter()
    while sent < total:
        n = min(chunk, c.local_flow_control_window(sid))
        if n:
            c.send_data(sid, data[:n])
            sent += n
        for ev in s.receive_data(c.data_to_send()):
            if isinstance(ev, h2.events.DataReceived):
                s.acknowledge_received_data(ev.flow_controlled_length, sid)
        c.receive_data(s.data_to_send())
    return time.perf_counter() - t0


def hbone(total: int, chunk: int) -> float:
    """Seconds to move `total` bytes client -> server through HboneProtocol."""
    c, s = p.HboneProtocol(True, 0.0), p.HboneProtocol(False, 0.0)
    s.receive(c.data_to_send(), 0.0)
    c.receive(s.data_to_send(), 0.0)
    sid = c.open_stream(ConnectRequest("10.0.0.1:80"))
    s.receive(c.data_to_send(), 0.0)
    s.respond(sid, 200)
    c.receive(s.data_to_send(), 0.0)
    data = memoryview(bytes(chunk))
    sent = 0
    t0 = time.perf_counter()
    while sent < total:
        sent += c.send_data(sid, data)
        for ev in s.receive(c.data_to_send(), 0.0):
            if isinstance(ev, p.DataReceived):
                s.consumed(ev.stream_id, ev.flow_controlled_length)
        c.receive(s.data_to_send(), 0.0)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="bytes moved per measurement")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk-kib", type=int, nargs="+", default=[16, 256])
    args = ap.parse_args()
    total = args.mib * MiB
    for kib in args.chunk_kib:
        chunk = kib * 1024
        base: list[float] = []
        ours: list[float] = []
        for _ in range(args.reps):
            base.append(raw_h2(total, chunk))
            ours.append(hbone(total, chunk))
        gbps_base = total * 8 / statistics.median(base) / 1e9
        gbps_ours = total * 8 / statistics.median(ours) / 1e9
        print(
            f"chunk {kib:4d} KiB: h2 alone {gbps_base:6.2f} Gbit/s, HboneProtocol "
            f"{gbps_ours:6.2f} Gbit/s, ratio {gbps_ours / gbps_base:.3f}"
        )


if __name__ == "__main__":
    main()
