import sys
import time
from typing import TextIO


class Progress:
    """A one-line progress bar on a terminal (or a line every `log_every` seconds
    elsewhere): count, rate, time left and whatever `update` is given to show."""

    def __init__(self, total: int, description: str = "", stream: TextIO | None = None):
        self.total = total
        self.description = description
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self._interactive = self.stream.isatty()

    def update(self, count: int = 1, **values: float | str) -> None:
        self.done += count
        now = time.perf_counter()
        if not self._interactive and now - self._last < 10 and self.done < self.total:
            return
        self._last = now
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        width = 20
        filled = int(width * self.done / max(self.total, 1))
        shown = " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
        )
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"{self.description} [{bar}] {self.done}/{self.total} "
            f"{rate:.2f}/s, {_duration(left)} left {shown}"
        )
        if self._interactive:
            self.stream.write("\r" + line[:200].ljust(80))
            if self.done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
