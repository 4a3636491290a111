"""Refusal log lines, bounded: a hostile agent (or, for Join, anyone who reaches the port) can make
the gateway refuse thousands of times a second. Each refusal is still counted on /metrics; the log
keeps the first few of each kind per minute and then says how many more there were."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

PER_WINDOW = 5
WINDOW_S = 60.0
MAX_KEYS = 1024  # kinds remembered at once: keys come from node names and fixed reasons


@dataclass
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0


class LimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        per_window: int = PER_WINDOW,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger, self._per_window, self._window_s, self._clock = logger, per_window, window_s, clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def warning(self, key: str, message: str, *args: object) -> None:
        now = self._clock()
        self._summarize_ended(now)  # whatever kind they were: a flood that stopped is summed up too
        window = self._windows.get(key)
        if window is None:
            window = _Window(now)
            self._windows[key] = window
            while len(self._windows) > MAX_KEYS:
                evicted_key, evicted = self._windows.popitem(last=False)
                self._summarize(evicted_key, evicted, now)
        self._windows.move_to_end(key)
        if window.logged < self._per_window:
            window.logged += 1
            self._logger.warning(message, *args)
            if window.logged == self._per_window:
                self._logger.warning("further refusals like that (%s) are summarized for %.0fs", key, self._window_s)
        else:
            window.suppressed += 1

    def _summarize_ended(self, now: float) -> None:
        ended = [key for key, window in self._windows.items() if now - window.started >= self._window_s]
        for key in ended:
            self._summarize(key, self._windows.pop(key), now)

    def _summarize(self, key: str, window: _Window, now: float) -> None:
        if window.suppressed:
            self._logger.warning(
                "... and %d more like that (%s) in %.0fs, counted on /metrics", window.suppressed, key,
                now - window.started,
            )  # fmt: skip
