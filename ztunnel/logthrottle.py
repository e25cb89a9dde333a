"""Log lines that an attacker can trigger at will, throttled: at most a few per window and
kind, then one line saying how many were left out, so a flood never turns into a log flood."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

WINDOW = 10.0
PER_WINDOW = 5


class ThrottledLog:
    """`warn(kind, msg, *args)` logs the first `per_window` lines of each kind per window."""

    def __init__(
        self,
        logger: logging.Logger,
        window: float = WINDOW,
        per_window: int = PER_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.window = window
        self.per_window = per_window
        self._clock = clock
        # kind -> [window start, lines logged in it, lines left out]
        self._kinds: dict[str, list[float]] = {}

    def warn(self, kind: str, msg: str, *args: object) -> None:
        now = self._clock()
        state = self._kinds.get(kind)
        if state is None or now - state[0] >= self.window:
            if state is not None and state[2]:
                self.logger.warning(
                    "%s: %d more like this in the last %.0fs were not logged",
                    kind,
                    int(state[2]),
                    now - state[0],
                )
            state = self._kinds[kind] = [now, 0, 0]
        if state[1] < self.per_window:
            state[1] += 1
            self.logger.warning(msg, *args)
        else:
            state[2] += 1
