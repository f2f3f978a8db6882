"""A dependency-free progress line: done/total, rate, ETA and a few live values.

On a terminal it redraws one line; in logs (CI, cluster jobs) it prints a line every few seconds.
``configure(format="json")`` makes every line a JSON object instead (``--progress json``), and
``configure(log_file=...)`` also appends each line to a file (``--log-file``), so SLURM or
dask-jobqueue jobs can be watched without a terminal.
"""

from __future__ import annotations

import json
import sys
import time

FORMATS = ("text", "json")
_SETTINGS: dict = {"format": "text", "log_file": None}


def configure(format: str | None = None, log_file: str | None = None) -> None:
    """Process-wide output of every progress line (the CLI's ``--progress`` and ``--log-file``)."""
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"--progress {format}: choose one of {', '.join(FORMATS)}")
        _SETTINGS["format"] = format
    if log_file is not None:
        with open(log_file, "a"):  # fails now, as one line, if the file cannot be written
            pass
        _SETTINGS["log_file"] = log_file


def _fmt_time(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def decision(text: str, kind: str, stream=None, **data) -> None:
    """One decision (what was chosen, on which figures, and the flag that reverses it) on standard
    output: the text line, or under ``--progress json`` a JSON object ``{"event": "decision", "kind":
    ..., "text": ..., **data}``; appended to ``--log-file`` too, so a job's log says what was done and
    why, not only how far it got."""
    stream = stream or sys.stdout
    record = {"event": "decision", "kind": kind, "text": text, "time": time.time(), **data}
    out = json.dumps(record, default=str) if _SETTINGS["format"] == "json" else text
    stream.write(out + "\n")
    stream.flush()
    if _SETTINGS["log_file"]:
        with open(_SETTINGS["log_file"], "a") as fh:
            fh.write(out + "\n")


class Progress:
    def __init__(
        self,
        total: int,
        label: str,
        unit: str = "it",
        quiet: bool = False,
        rate_scale: float = 1.0,
        rate_unit: str | None = None,
        stream=None,
        interval: float = 5.0,
    ):
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
        if _SETTINGS["format"] == "json":
            self.stream.write(json.dumps(self.record(now)) + "\n")
        else:
            self.stream.write(("\r" if self.tty else "") + self.line(now) + ("" if self.tty else "\n"))
        self.stream.flush()
        if _SETTINGS["log_file"]:
            with open(_SETTINGS["log_file"], "a") as fh:
                fh.write((json.dumps(self.record(now)) if _SETTINGS["format"] == "json" else self.line(now)) + "\n")

    def record(self, now: float | None = None) -> dict:
        """The line as data: one JSON object per line under ``--progress json``."""
        now = now or time.perf_counter()
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        return {
            "event": "progress",
            "label": self.label,
            "done": self.done,
            "total": self.total,
            "unit": self.unit,
            "rate_per_s": rate * self.rate_scale,
            "rate_unit": self.rate_unit or self.unit + "/s",
            "elapsed_s": round(elapsed, 3),
            "eta_s": None if eta is None else round(eta, 3),
            "time": time.time(),
            **self.values,
        }

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        shown_rate = f"{rate * self.rate_scale:.3g} {self.rate_unit or self.unit + '/s'}"
        extra = " ".join(f"{k}={v}" for k, v in self.values.items())
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:3.0f}%) {shown_rate} "
            f"elapsed {_fmt_time(elapsed)} ETA {_fmt_time(eta)} {extra}"
        ).rstrip()

    def close(self) -> None:
        if not self.quiet:
            self.update(self.done, force=True)
            if self.tty and _SETTINGS["format"] == "text":
                self.stream.write("\n")
                self.stream.flush()
