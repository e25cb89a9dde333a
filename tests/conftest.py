"""Shared test machinery: running `async def` tests without a plugin, and tier markers.

An `async def` test runs on a fresh event loop (or on the `loop` fixture's loop when the
test or one of its fixtures uses it) under a hard timeout: the test's
`@pytest.mark.timeout(N)` minus a margin, else `ASYNC_TIMEOUT` seconds. Tests under
`tests/unit` and `tests/integration` get the `unit` / `integration` marker when they lack it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

ASYNC_TIMEOUT = 60.0
_TIERS = {"unit", "integration", "lab"}


def run_coroutine(
    coro: Coroutine[Any, Any, Any], timeout: float, loop: asyncio.AbstractEventLoop | None = None
) -> Any:
    """Run `coro` to completion within `timeout` seconds (TimeoutError otherwise)."""

    async def guarded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    if loop is None:
        return asyncio.run(guarded())
    return loop.run_until_complete(guarded())


def _timeout_for(item: pytest.Function) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return max(1.0, float(marker.args[0]) - 5.0)
    return ASYNC_TIMEOUT


def _shutdown_loop(loop: asyncio.AbstractEventLoop) -> None:
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        with contextlib.suppress(Exception):
            loop.run_until_complete(
                asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
            )
    with contextlib.suppress(Exception):
        loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh asyncio event loop for one test; async fixtures and the test share it."""
    lp = asyncio.new_event_loop()
    try:
        yield lp
    finally:
        _shutdown_loop(lp)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    fn = pyfuncitem.obj
    if not inspect.iscoroutinefunction(fn):
        return None
    names = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in pyfuncitem.funcargs.items() if k in names}
    loop = pyfuncitem.funcargs.get("loop")
    run_coroutine(fn(**kwargs), _timeout_for(pyfuncitem), loop)
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(str(config.rootpath)) / "tests"
    for item in items:
        if any(item.get_closest_marker(t) for t in _TIERS):
            continue
        try:
            tier = Path(str(item.path)).relative_to(root).parts[0]
        except ValueError:
            continue
        if tier in _TIERS:
            item.add_marker(getattr(pytest.mark, tier))
