"""The log handler's batching: lines logged on a running loop go out together at the end of
the loop iteration, in order; lines from elsewhere go out at once; JSON timestamps."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from ztunnel.logs import BatchingStreamHandler, JsonFormatter

pytestmark = pytest.mark.unit


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, CountingStream, BatchingStreamHandler]]:
    stream = CountingStream()
    handler = BatchingStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("ztunnel.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream, handler
    logger.removeHandler(handler)


def test_lines_on_a_loop_are_written_once_per_iteration_in_order(
    logged: tuple[logging.Logger, CountingStream, BatchingStreamHandler],
) -> None:
    logger, stream, _ = logged

    async def main() -> str:
        for i in range(3):
            logger.info("line %d", i)
        before = stream.getvalue()
        await asyncio.sleep(0)  # one loop iteration: the handler's flush runs first
        assert stream.getvalue() == "line 0\nline 1\nline 2\n"
        assert stream.writes == 1
        return before

    assert asyncio.run(main()) == ""


def test_lines_off_the_loop_are_written_at_once(
    logged: tuple[logging.Logger, CountingStream, BatchingStreamHandler],
) -> None:
    logger, stream, _ = logged
    logger.info("no loop")
    assert stream.getvalue() == "no loop\n"
    t = threading.Thread(target=logger.info, args=("from a thread",))
    t.start()
    t.join(5)
    assert stream.getvalue() == "no loop\nfrom a thread\n"


def test_flush_writes_what_is_pending(
    logged: tuple[logging.Logger, CountingStream, BatchingStreamHandler],
) -> None:
    logger, stream, handler = logged

    async def main() -> None:
        logger.info("pending")
        handler.flush()  # as logging.shutdown does at exit
        assert stream.getvalue() == "pending\n"

    asyncio.run(main())


def test_json_time_is_utc_with_milliseconds() -> None:
    fmt = JsonFormatter()
    for created in (1700000000.123, 1700000000.999, 1700000001.5):
        rec = logging.makeLogRecord({"msg": "m", "created": created, "msecs": created % 1 * 1000})
        assert (
            json.loads(fmt.format(rec))["time"]
            == ("2023-11-14T22:13:20" if created < 1700000001 else "2023-11-14T22:13:21")
            + f".{int(created % 1 * 1000):03d}Z"
        )


def test_a_loop_stopped_before_its_flush_does_not_hold_up_the_next(
    logged: tuple[logging.Logger, CountingStream, BatchingStreamHandler],
) -> None:
    logger, stream, _ = logged
    first = asyncio.new_event_loop()
    first.call_soon(logger.info, "on a loop that stops")
    first.call_soon(first.stop)
    first.run_forever()  # runs the two callbacks; the flush they scheduled never runs
    first.close()
    assert stream.getvalue() == ""

    async def main() -> None:
        logger.info("on the next loop")
        await asyncio.sleep(0)
        assert stream.getvalue() == "on a loop that stops\non the next loop\n"

    asyncio.run(main())
