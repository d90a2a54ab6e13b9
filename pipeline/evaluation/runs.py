"""Reading a run folder (parts + run.json) and a gold file, and joining them by id."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import DuplicateIdError, InputFormatError, InputNotFoundError, RunStateError
from pipeline.runfolder import Manifest, RunFolder

EXAMPLES = 5
KINDS = ("classify", "extract")


@dataclass
class Run:
    folder: Path
    manifest: Manifest
    table: pa.Table
    id_column: str
    parts: int

    @property
    def task(self) -> str:
        return self.manifest.task

    def evaluation(self) -> str:
        """``classify`` or ``extract``: what run.json's ``evaluation`` declares for the task's output."""
        if "evaluation" not in self.manifest.model_fields_set:
            # Run folders written before the key existed: only the extract task was scored differently.
            return "extract" if self.task == "extract" else "classify"
        kind = self.manifest.evaluation
        if kind in KINDS:
            return kind
        hint = (
            'its task declares no evaluation (run.json: "evaluation": null)'
            if kind is None
            else f"run.json asks for evaluation {kind!r}; labelmill eval knows {', '.join(KINDS)}"
        )
        raise RunStateError(
            f"run {self.folder}: task '{self.task}' has no evaluation labelmill eval knows",
            hint=hint,
        )


def load_run(folder: str | Path) -> Run:
    """run.json and every part of a run folder."""
    run_folder = RunFolder(folder)
    folder = run_folder.root
    manifest = run_folder.manifest()
    if manifest is None:
        raise RunStateError(
            f"{folder} is not a labelmill run folder (no run.json)",
            hint="give the run's output: folder, e.g. out/products-oa-mine",
        )
    paths = run_folder.part_names()
    if not paths:
        raise RunStateError(
            f"{folder} has no output parts yet", hint="run the job first: labelmill run JOB_FILE"
        )
    try:
        table = pa.concat_tables(run_folder.read_part(p) for p in paths)
    except (OSError, pa.ArrowInvalid) as exc:
        raise RunStateError(f"cannot read the parts of {folder}: {exc}") from None
    return Run(folder, manifest, table, manifest.id_column, len(paths))


def load_gold(path: str | Path, on: str, column: str) -> pa.Table:
    """The gold file's ``on`` and ``column`` columns; CSV cells are read as text, never guessed."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"gold file {path} not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            table = pq.read_table(path)
        elif suffix in (".csv", ".tsv"):
            # Text, so an id like 007 keeps its zeros and a label like "1" stays a label.
            types = {on: pa.string(), column: pa.string()}
            parse = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            table = pacsv.read_csv(
                path, parse_options=parse, convert_options=pacsv.ConvertOptions(column_types=types)
            )
        else:
            raise InputFormatError(
                f"gold file {path}: unknown format '{suffix}'", hint="give a .parquet or .csv file"
            )
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputFormatError(f"cannot read gold file {path}: {exc}") from None
    missing = [c for c in (on, column) if c not in table.column_names]
    if missing:
        raise InputFormatError(
            f"gold file {path} has no column {', '.join(repr(m) for m in missing)}",
            hint=f"its columns: {', '.join(table.column_names)}; choose them with --on / --gold-column",
        )
    return table.select([on, column])


@dataclass
class Join:
    """Which run row goes with which gold row, and what was left over on each side."""

    pairs: list[tuple[int, int]]
    run_rows: int
    gold_rows: int
    only_in_run: list = field(default_factory=list)
    only_in_gold: list = field(default_factory=list)
    ids_as_text: bool = False

    def summary(self) -> dict:
        return {
            "run_rows": self.run_rows,
            "gold_rows": self.gold_rows,
            "matched": len(self.pairs),
            "only_in_run": len(self.only_in_run),
            "only_in_run_examples": [str(i) for i in self.only_in_run[:EXAMPLES]],
            "only_in_gold": len(self.only_in_gold),
            "only_in_gold_examples": [str(i) for i in self.only_in_gold[:EXAMPLES]],
            "ids_compared_as_text": self.ids_as_text,
        }


def join(run_ids: list, gold_ids: list, gold_name: str = "gold file") -> Join:
    """Pair rows by id. Gold ids must be unique and non-null: a repeated id has no single answer."""
    _check_unique(gold_ids, gold_name)
    _check_unique(run_ids, "run output")
    as_text = {type(i) for i in run_ids if i is not None} != {type(i) for i in gold_ids if i is not None}
    if as_text and run_ids and gold_ids:  # e.g. int ids in the run, the same ids as CSV text in gold
        run_ids, gold_ids = [str(i) for i in run_ids], [str(i) for i in gold_ids]
    gold_index = {g: n for n, g in enumerate(gold_ids)}
    pairs, only_run = [], []
    for n, rid in enumerate(run_ids):
        if rid in gold_index:
            pairs.append((n, gold_index[rid]))
        else:
            only_run.append(rid)
    in_run = set(run_ids)
    only_gold = [g for g in gold_ids if g not in in_run]
    return Join(
        pairs, len(run_ids), len(gold_ids), only_run, only_gold, as_text and bool(run_ids and gold_ids)
    )


def _check_unique(ids: list, name: str) -> None:
    nulls = sum(i is None for i in ids)
    if nulls:
        raise DuplicateIdError(
            f"{name}: the id column holds {nulls} null(s)", hint="every row needs an id to be joined"
        )
    repeated = [i for i, c in Counter(ids).items() if c > 1]
    if repeated:
        shown = ", ".join(repr(i) for i in repeated[:EXAMPLES])
        raise DuplicateIdError(
            f"{name}: {len(repeated)} id(s) occur more than once, e.g. {shown}",
            hint="each id needs exactly one gold answer; remove the repeats or join on another column (--on)",
        )
