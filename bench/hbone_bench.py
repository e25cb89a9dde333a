"""Microbenchmark of the HBONE data path without sockets: DATA through a client/server pair of
`HboneProtocol` in memory (sender queues, receiver parses and returns the window), against
python-hyper h2 alone with the same settings as baseline, so the figure is the cost of our
layer (CONNECT handling, abuse limits, event translation) over h2's; `--against FILE` adds
another version of `ztunnel/hbone/protocol.py` (e.g. from a checkout of main) to compare
with. CPU time of this process, best of interleaved repetitions (robust on a busy machine);
every loop is bounded by a byte count.

    .venv/bin/python bench/hbone_bench.py [--mib 64] [--reps 9] [--chunk-kib 16 64 256]
        [--against /path/to/other/ztunnel/hbone/protocol.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from types import ModuleType
from typing import Any

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
    t0 = time.process_time()
    while sent < total:
        n = min(chunk, c.local_flow_control_window(sid))
        if n:
            c.send_data(sid, data[:n])
            sent += n
        for ev in s.receive_data(c.data_to_send()):
            if isinstance(ev, h2.events.DataReceived):
                s.acknowledge_received_data(ev.flow_controlled_length, sid)
        c.receive_data(s.data_to_send())
    return time.process_time() - t0


def hbone(total: int, chunk: int, proto: Any = p) -> float:
    """Seconds to move `total` bytes client -> server through HboneProtocol (of `proto`)."""
    c, s = proto.HboneProtocol(True, 0.0), proto.HboneProtocol(False, 0.0)
    s.receive(c.data_to_send(), 0.0)
    c.receive(s.data_to_send(), 0.0)
    sid = c.open_stream(ConnectRequest("10.0.0.1:80"))
    s.receive(c.data_to_send(), 0.0)
    s.respond(sid, 200)
    c.receive(s.data_to_send(), 0.0)
    data = memoryview(bytes(chunk))
    sent = 0
    t0 = time.process_time()
    while sent < total:
        sent += c.send_data(sid, data)
        for ev in s.receive(c.data_to_send(), 0.0):
            if isinstance(ev, proto.DataReceived):
                s.consumed(ev.stream_id, ev.flow_controlled_length)
        c.receive(s.data_to_send(), 0.0)
    return time.process_time() - t0


def load_protocol(path: str) -> ModuleType:
    """Another version of protocol.py, imported under its own name."""
    spec = importlib.util.spec_from_file_location("hbone_protocol_other", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="bytes moved per measurement")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--chunk-kib", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--against", help="another protocol.py to compare with")
    args = ap.parse_args()
    other = load_protocol(args.against) if args.against else None
    total = args.mib * MiB
    for kib in args.chunk_kib:
        chunk = kib * 1024
        base: list[float] = []
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(args.reps):
            base.append(raw_h2(total, chunk))
            ours.append(hbone(total, chunk))
            if other is not None:
                theirs.append(hbone(total, chunk, other))
        gbps_base = total * 8 / min(base) / 1e9
        gbps_ours = total * 8 / min(ours) / 1e9
        line = (
            f"chunk {kib:4d} KiB: h2 alone {gbps_base:6.2f} Gbit/s per CPU second, "
            f"HboneProtocol {gbps_ours:6.2f} ({gbps_ours / gbps_base:.3f} of h2)"
        )
        if theirs:
            gbps_theirs = total * 8 / min(theirs) / 1e9
            line += f", --against {gbps_theirs:6.2f}: this / that {gbps_ours / gbps_theirs:.3f}"
        print(line)


if __name__ == "__main__":
    main()
