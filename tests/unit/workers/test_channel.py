"""The workers' control channel framing (`ztunnel.workers.channel`): whole messages from any
split of the bytes, and clear errors for oversized, undecodable or shapeless frames."""

from __future__ import annotations

import pickle
import struct

import pytest

from ztunnel.localconfig import parse_documents
from ztunnel.state import MeshState
from ztunnel.workers.channel import ChannelError, FrameDecoder, encode
from ztunnel.workers.supervisor import state_message

pytestmark = pytest.mark.unit


def test_messages_survive_any_split_of_the_stream() -> None:
    msgs = [("hello", 1, {"a": 1}), ("stats", [1.5], {"live": []}), ("drain", 2.0)]
    wire = b"".join(encode(m) for m in msgs)
    for step in (1, 3, 7, len(wire)):
        dec = FrameDecoder()
        got = []
        for i in range(0, len(wire), step):
            got += dec.feed(wire[i : i + step])
        assert got == msgs


def test_a_mesh_snapshot_round_trips_and_rebuilds_its_indexes() -> None:
    state = parse_documents(
        [
            {
                "workloads": [
                    {
                        "uid": "u1",
                        "name": "p",
                        "namespace": "ns",
                        "workloadIps": ["10.0.0.5"],
                        "node": "n",
                        "protocol": "HBONE",
                    }
                ],
                "policies": [
                    {
                        "name": "deny",
                        "namespace": "ns",
                        "scope": "Namespace",
                        "action": "Deny",
                        "rules": [[[{"destinationPorts": [9090]}]]],
                    }
                ],
            }
        ],
        "test",
    )
    (msg,) = FrameDecoder().feed(encode(state_message(state)))
    rebuilt = MeshState.build(msg[1], msg[2], msg[3])
    assert rebuilt.workload_by_ip("10.0.0.5") == state.workload_by_ip("10.0.0.5")
    assert rebuilt.policies == state.policies and len(rebuilt.policies) == 1


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (struct.pack("!I", 1 << 30), "exceeds"),
        (struct.pack("!I", 3) + b"\x80\x05X", "undecodable"),
        (struct.pack("!I", len(pickle.dumps([1]))) + pickle.dumps([1]), "not a message"),
        (struct.pack("!I", len(pickle.dumps(()))) + pickle.dumps(()), "not a message"),
    ],
)
def test_bad_frames_are_errors(frame: bytes, error: str) -> None:
    with pytest.raises(ChannelError, match=error):
        FrameDecoder().feed(frame)


def test_a_partial_header_waits_for_more() -> None:
    dec = FrameDecoder()
    frame = encode(("ready",))
    assert dec.feed(frame[:2]) == []
    assert dec.feed(frame[2:]) == [("ready",)]
