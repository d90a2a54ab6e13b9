"""The run folder: what is finished, what the run was, and who holds it.

    out/<run>/
      run.json            manifest: job fingerprint and its parts, provenance, chunk plan size
      job.yaml            the resolved job, as run
      parts/part-00012.parquet
      done/chunk-00012.json   marker, written only after its part is on disk
      summary.json        totals of the last invocation
      answers/            the run's own answer store, when the shared result cache is off
                          (see pipeline/cache.py); removed when the run is complete
      .lock               held (flock) by the running process

A chunk counts as finished when its marker exists and its part file is there. A part without a
marker (killed between the two writes) is simply redone; a temporary file is removed on start.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa

from pipeline.errors import JobChangedError, OutputError, RunLockedError
from pipeline.io import write_parquet_atomic, write_text_atomic


class RunFolder:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.parts = self.root / "parts"
        self.markers = self.root / "done"
        self.answers = self.root / "answers"
        self.manifest_path = self.root / "run.json"
        self.summary_path = self.root / "summary.json"
        self.job_path = self.root / "job.yaml"
        self.lock_path = self.root / ".lock"

    def part_path(self, chunk: int) -> Path:
        return self.parts / f"part-{chunk:05d}.parquet"

    def marker_path(self, chunk: int) -> Path:
        return self.markers / f"chunk-{chunk:05d}.json"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this process; the kernel drops the lock if the process dies."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fh = self.lock_path.open("a+")
        except OSError as exc:
            raise OutputError(f"cannot create run folder {self.root}: {exc}") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunLockedError(
                f"run folder {self.root} is in use by {holder}",
                hint="wait for that run to finish (labelmill status shows its progress), or "
                "give this job another output: folder",
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fh.close()

    def is_locked(self) -> bool:
        if not self.lock_path.exists():
            return False
        with self.lock_path.open("a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
        return False

    def manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def prepare(self, manifest: dict, job_yaml: str, restart: bool) -> None:
        """Start a new run, or check that the one on disk is the same job. Call under ``lock``."""
        if restart:
            for path in (self.parts, self.markers, self.answers):
                shutil.rmtree(path, ignore_errors=True)
            for path in (self.manifest_path, self.summary_path):
                path.unlink(missing_ok=True)
        old = self.manifest()
        if old is not None and old.get("fingerprint") != manifest["fingerprint"] and not self.finished():
            old = None  # nothing was finished under the old job (it failed at start): nothing to protect
        if old is not None and old.get("fingerprint") != manifest["fingerprint"]:
            before, now = old.get("components", {}), manifest["components"]
            changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
            raise JobChangedError(
                f"the job changed since {self.root} was started: {', '.join(changed)} differ",
                hint="to keep the finished parts, give the job a new output: folder; to discard "
                f"them and start over here, rerun with --restart ({len(self.finished())} "
                "finished chunk(s) would be deleted)",
            )
        self.parts.mkdir(parents=True, exist_ok=True)
        self.markers.mkdir(parents=True, exist_ok=True)
        for folder in (self.parts, self.markers, self.root):
            for tmp in folder.glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)
        if old is None:
            self.summary_path.unlink(missing_ok=True)
            write_text_atomic(json.dumps(manifest, indent=2, ensure_ascii=False), self.manifest_path)
        write_text_atomic(job_yaml, self.job_path)

    def finished(self) -> dict[int, dict]:
        """Markers of finished chunks whose part file exists, by chunk index."""
        done = {}
        if not self.markers.is_dir():
            return done
        for path in sorted(self.markers.glob("chunk-*.json")):
            marker = json.loads(path.read_text(encoding="utf-8"))
            if self.part_path(marker["chunk"]).exists():
                done[marker["chunk"]] = marker
        return done

    def commit(self, chunk: int, table: pa.Table, marker: dict) -> None:
        """Part first, marker second: a marker always vouches for a complete part."""
        write_parquet_atomic(table, self.part_path(chunk))
        write_text_atomic(json.dumps(marker, ensure_ascii=False), self.marker_path(chunk))

    def write_summary(self, summary: dict) -> None:
        write_text_atomic(json.dumps(summary, indent=2, ensure_ascii=False), self.summary_path)
