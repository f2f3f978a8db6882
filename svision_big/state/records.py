"""Done-records: one empty object per finished block (``DoneRecords``)."""

from __future__ import annotations

import json

from ..store import fs_and_path


class DoneRecords:
    """One empty object per finished block under ``url``: explicit, survives any crash,
    cheap to list on resume, and independent of whether chunks equal the fill value."""

    def __init__(self, url: str, options: dict | None = None):
        self.url = url
        self.fs, self.root = fs_and_path(url, options)

    def create(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    def mark(self, index: int) -> None:
        self.fs.pipe_file(f"{self.root}/{index}", b"")

    def note(self, index: int, note: dict) -> None:
        """What a block found in its input (missing chunks, non-finite values), beside its record."""
        self.fs.pipe_file(f"{self.root}/{index}.json", json.dumps(note).encode())

    def notes(self) -> list[dict]:
        """Every block's note (only blocks that found something have one)."""
        try:
            self.fs.invalidate_cache(self.root)
            names = [n for n in self.fs.ls(self.root, detail=False) if n.endswith(".json")]
        except FileNotFoundError:
            return []
        return [json.loads(self.fs.cat_file(n)) for n in names]

    def clear(self) -> None:
        """Forget every record (the array they describe is about to be created anew)."""
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)
        self.fs.invalidate_cache(self.root)

    def load(self) -> set[int]:
        try:
            self.fs.invalidate_cache(self.root)
            names = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return set()
        out = set()
        for n in names:
            base = n.rstrip("/").rsplit("/", 1)[-1]
            if base.isdigit():
                out.add(int(base))
        return out
