"""Progress of a long operator command: a bar with rate and ETA on a terminal, plain lines at a
steady pace otherwise (a job's log is no terminal, and a redrawn bar would fill it with control
characters), and notes that print between them without breaking the bar."""
from __future__ import annotations

import time
from typing import Protocol, TextIO

#: Seconds between two plain progress lines.
LINE_INTERVAL_SECONDS = 10.0


class Progress(Protocol):
    def advance(self, done: int) -> None:
        """``done`` more items are done."""

    def note(self, line: str) -> None:
        """Print a line of its own (the bar, if any, is redrawn below it)."""

    def close(self) -> None:
        """The work is over (or failed): leave the terminal tidy."""


def progress(total: int, stream: TextIO, unit: str = "rows") -> Progress:
    """A progress bar (tqdm) when ``stream`` is a terminal, plain lines otherwise."""
    if stream.isatty():
        return _Bar(total, stream, unit)
    return _Lines(total, stream, unit)


class _Bar:
    def __init__(self, total: int, stream: TextIO, unit: str) -> None:
        from tqdm import tqdm  # only where a terminal shows it

        self.stream = stream
        self.bar = tqdm(total=total, file=stream, unit=f" {unit}", unit_scale=True, dynamic_ncols=True)

    def advance(self, done: int) -> None:
        self.bar.update(done)

    def note(self, line: str) -> None:
        self.bar.write(line, file=self.stream)

    def close(self) -> None:
        self.bar.close()


class _Lines:
    def __init__(self, total: int, stream: TextIO, unit: str, clock=time.monotonic) -> None:
        self.total = total
        self.stream = stream
        self.unit = unit
        self.clock = clock
        self.started = self.last = clock()
        self.done = 0

    def advance(self, done: int) -> None:
        self.done += done
        now = self.clock()
        if now - self.last >= LINE_INTERVAL_SECONDS:
            self.last = now
            self.note(self.line(now))

    def line(self, now: float) -> str:
        rate = self.done / max(now - self.started, 1e-9)
        left = max(self.total - self.done, 0)
        eta = _duration(left / rate) if rate > 0 else "?"
        share = f" ({100 * self.done // self.total}%)" if self.total else ""
        return f"{self.done} of {self.total} {self.unit}{share}, {rate:.0f} {self.unit}/s, ETA {eta}"

    def note(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
