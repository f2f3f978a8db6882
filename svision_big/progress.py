"""A dependency-free progress line: done/total, rate, ETA and a few live values.

On a terminal it redraws one line; in logs (CI, cluster jobs) it prints a line every few seconds.
"""

from __future__ import annotations

import sys
import time


def _fmt_time(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    def __init__(self, total: int, label: str, unit: str = "it", quiet: bool = False,
                 rate_scale: float = 1.0, rate_unit: str | None = None, stream=None, interval: float = 5.0):
        self.total, self.label, self.unit, self.quiet = total, label, unit, quiet
        self.rate_scale, self.rate_unit = rate_scale, rate_unit
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = 0.2 if self.tty else interval
        self.start = time.perf_counter()
        self.last = 0.0
        self.done = 0
        self.values: dict[str, str] = {}

    def update(self, done: int, force: bool = False, **values) -> None:
        self.done = done
        self.values.update({k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in values.items()})
        now = time.perf_counter()
        if self.quiet or (not force and now - self.last < self.interval and done < self.total):
            return
        self.last = now
        self.stream.write(("\r" if self.tty else "") + self.line(now) + ("" if self.tty else "\n"))
        self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        shown_rate = f"{rate * self.rate_scale:.3g} {self.rate_unit or self.unit + '/s'}"
        extra = " ".join(f"{k}={v}" for k, v in self.values.items())
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:3.0f}%) {shown_rate} "
                f"elapsed {_fmt_time(elapsed)} ETA {_fmt_time(eta)} {extra}").rstrip()

    def close(self) -> None:
        if not self.quiet:
            self.update(self.done, force=True)
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()
