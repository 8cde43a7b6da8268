"""Progress on the command line, fed by `progress(stage, fraction of the whole job)` callbacks: a rich bar with
the smoothed time left on a terminal, or one structured log line every few seconds (and at each new stage)
when stdout is not a terminal (CI logs, `nohup`, a pipe)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from ..logs import progress_logger
from ..progress import RemainingTime

log = progress_logger()
ProgressFn = Callable[[str, float], None]


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LogLines:
    """`progress stage=… percent=… elapsed_s=… eta_s=…` at most every `interval_s`, whenever the stage changes,
    and once at 100%."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s, self._clock = interval_s, clock
        self.remaining = RemainingTime(clock=clock)
        self._stage: str | None = None
        self._last = -float("inf")
        self._finished = False

    def __call__(self, stage: str, fraction: float) -> None:
        self.remaining.update(fraction)
        now = self._clock()
        finished = fraction >= 1.0 and not self._finished
        if stage == self._stage and now - self._last < self.interval_s and not finished:
            return
        self._stage, self._last, self._finished = stage, now, self._finished or fraction >= 1.0
        eta = self.remaining.remaining()
        log.info(
            "progress",
            extra={
                "stage": stage,
                "percent": round(100 * fraction, 1),
                "elapsed_s": round(self.remaining.elapsed(), 1),
                "eta_s": None if eta is None else round(eta),
            },
        )


@contextlib.contextmanager
def rich_bar() -> Iterator[ProgressFn]:
    """A rich bar on stdout: stage, bar, percent, elapsed and the smoothed time left."""
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    remaining = RemainingTime()

    class TimeLeft(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"ETA {_clock(remaining.remaining())}", style="progress.remaining")

    with Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
        TimeLeft(),
    ) as bar:
        task = bar.add_task("starting", total=1.0)

        def report(stage: str, fraction: float) -> None:
            remaining.update(fraction)
            bar.update(task, description=stage, completed=fraction)

        yield report


@contextlib.contextmanager
def progress_bar(*, interval_s: float = 10.0) -> Iterator[ProgressFn]:
    """The bar on a terminal, log lines every `interval_s` otherwise (errors go to stderr either way)."""
    if sys.stdout.isatty():
        with rich_bar() as report:
            yield report
    else:
        yield LogLines(interval_s)
