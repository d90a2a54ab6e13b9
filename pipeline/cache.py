"""A result cache that outlives runs: SQLite on disk, one row per (namespace, text sent).

The namespace is a digest of everything that decides an answer besides the text: the model (with
its checkpoint fingerprint), the prompt, the labels or attributes, sampling and the engine settings
that change outputs. The text is exactly what was sent (after cleaning and truncation), so an
answer from the cache is the answer the model gives that text, and a cached run's output equals an
uncached one's. Tomorrow's nightly run of the same job asks the model only about new texts.
Only real answers are stored (never a failed request), as the backend returned them, so they are
parsed exactly like fresh ones.

SQLite commits are atomic and the database runs in WAL mode: a crash mid-write loses at most the
uncommitted chunk's entries, never corrupts earlier ones. Several runs may share one cache file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import asdict
from pathlib import Path

from pipeline.backends.base import Completion
from pipeline.errors import OutputError

_BATCH = 500  # keys per SELECT: below SQLite's variable limit


class ResultCache:
    def __init__(self, path: str | Path, namespace: str) -> None:
        self.path = Path(path)
        self.namespace = namespace
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS answers ("
                " key TEXT PRIMARY KEY, namespace TEXT NOT NULL, completion TEXT NOT NULL)"
            )
        except sqlite3.Error as exc:
            raise OutputError(
                f"cannot open the result cache {self.path}: {exc}", hint="use --no-cache"
            ) from None

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.namespace}\0{text}".encode()).hexdigest()

    def get_many(self, texts: list[str]) -> dict[str, Completion]:
        """Cached answers for those of ``texts`` that have one."""
        by_key = {self._key(t): t for t in texts}
        found: dict[str, Completion] = {}
        keys = list(by_key)
        for start in range(0, len(keys), _BATCH):
            part = keys[start : start + _BATCH]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(f"SELECT key, completion FROM answers WHERE key IN ({marks})", part)
            for key, blob in rows:
                found[by_key[key]] = Completion(**json.loads(blob))
        return found

    def put_many(self, answers: dict[str, Completion]) -> None:
        rows = [
            (self._key(text), self.namespace, json.dumps(asdict(c) | {"retries": 0}))
            for text, c in answers.items()
            if c.error is None
        ]
        try:
            with self._db:  # one transaction: all of a chunk's answers, or none
                self._db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)", rows)
        except sqlite3.Error as exc:
            raise OutputError(
                f"cannot write the result cache {self.path}: {exc}", hint="use --no-cache"
            ) from None

    def stats(self) -> dict:
        entries = self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        mine = self._db.execute(
            "SELECT COUNT(*) FROM answers WHERE namespace = ?", (self.namespace,)
        ).fetchone()[0]
        size = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())
        return {"path": str(self.path), "entries": entries, "entries_for_this_job": mine, "bytes": size}

    def close(self) -> None:
        self._db.close()
