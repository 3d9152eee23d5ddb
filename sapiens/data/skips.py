"""Skipped samples: counted, warned about without flooding the log, and bounded in count and in time.

A data set whose samples are all unreadable must fail, not spin: a streak of skips without one good
sample in between ends the stream after ``max_streak`` skips or ``max_streak_s`` seconds, whichever
comes first (slow-to-reject samples, e.g. huge corrupt JPEGs, make the time bound the one that
matters). And since such a streak never reaches a training-step boundary, where Lightning looks at
termination signals, the stream also checks a stop flag between samples: :func:`stop_on_signals`
sets it on SIGTERM / SIGINT in the main process, and DataLoader workers share it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import time

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(RuntimeError):
    """A termination signal arrived while the data pipeline was skipping samples."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        # Re-raised from a DataLoader worker, the error is rebuilt from its message alone.
        self.signum = int(signum or (signal.SIGINT if "stopped by SIGINT" in message else signal.SIGTERM))


class UnusableDataError(RuntimeError):
    """Too many samples in a row (or for too long) were skipped: the data looks unusable."""


def new_stop_flag():
    """A flag shared with DataLoader worker processes (0 = run, else the signal number)."""
    return mp.Value("i", 0)


def stop_on_signals(flag) -> None:
    """Make SIGTERM and SIGINT set ``flag`` (then run the handler that was there before, e.g.
    Lightning's, or the default KeyboardInterrupt). Main thread of the main process only; the
    handlers of a finished fit are restored by Lightning, which records them at fit start."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        previous = signal.getsignal(signum)
        if getattr(previous, "stop_flag", None) is flag:
            continue  # already installed for this flag

        def handler(sig, frame, previous=previous):
            flag.value = int(sig)
            if callable(previous):
                previous(sig, frame)
            elif previous == signal.SIG_DFL and sig == signal.SIGINT:
                raise KeyboardInterrupt
            elif previous == signal.SIG_DFL:  # the default action of SIGTERM: terminate now
                signal.signal(sig, signal.SIG_DFL)
                signal.raise_signal(sig)

        handler.stop_flag = flag
        signal.signal(signum, handler)


class SkipTally:
    """Counts the skipped samples / tars of one worker iteration; warns about the first few, then at
    most once per ``interval_s`` (with how many were silenced) so a bad shard cannot flood the log.

    Args:
        max_streak: skips in a row (no good sample between them) after which the data is unusable.
        max_streak_s: seconds of skipping without a good sample after which the same holds.
        stop_flag: from :func:`new_stop_flag`; a set flag ends the stream at the next skip.
    """

    def __init__(
        self,
        max_streak: int,
        max_streak_s: float | None = None,
        stop_flag=None,
        first: int = 5,
        interval_s: float = 60.0,
    ):
        self.max_streak, self.max_streak_s, self.stop_flag = max_streak, max_streak_s, stop_flag
        self.first, self.interval_s = first, interval_s
        self.total, self.pending, self.silenced, self.last, self.streak = 0, 0, 0, 0.0, 0
        self.streak_start = 0.0

    def good(self) -> None:
        self.streak = 0

    def skip(self, message: str) -> None:
        now = time.monotonic()
        if self.stop_flag is not None and self.stop_flag.value:
            signum = self.stop_flag.value
            name = signal.Signals(signum).name
            raise StopRequested(
                f"stopped by {name} while skipping unreadable samples; last: {message}", signum
            )
        self.total += 1
        self.pending += 1
        self.streak += 1
        if self.streak == 1:
            self.streak_start = now
        if self.streak >= self.max_streak:
            raise UnusableDataError(
                f"{self.streak} samples/shards in a row were skipped, the data looks unusable; "
                f"last: {message}"
            )
        if self.max_streak_s is not None and now - self.streak_start >= self.max_streak_s:
            raise UnusableDataError(
                f"{self.streak} samples/shards in a row were skipped over {now - self.streak_start:.0f} s "
                f"without one good sample (data.max_skip_seconds={self.max_streak_s:g}), the data looks "
                f"unusable; last: {message}"
            )
        if self.total <= self.first or now - self.last >= self.interval_s:
            extra = f" (+{self.silenced} similar warnings silenced)" if self.silenced else ""
            log.warning("skipping: %s%s [%d skipped in this worker]", message, extra, self.total)
            self.last, self.silenced = now, 0
        else:
            self.silenced += 1

    def take(self) -> int:
        """Skips since the previous call."""
        pending, self.pending = self.pending, 0
        return pending
