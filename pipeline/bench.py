"""``labelmill bench``: one sample, several backends, the cost of each in money.

    sample N rows of the job's input (seeded, spread over the whole input)
    for each backend profile: run the job on the sample, measure rows/s and tokens
    price each: self-hosted = measured labelling time x the stated GPU's $/hour;
                API = measured tokens x the price table
    project to --project rows; compare labels across backends (and with a gold column)
    write bench.json (raw numbers), bench.md (tables) and bench.png (chart)

API prices the bench did not run are still projected, from the tokens a measured backend used
(``--price-apis``); their tokenizers differ, so those rows are marked as estimates.
"""

from __future__ import annotations

import json
import os
import platform
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline import logs
from pipeline.config import JobConfig
from pipeline.costs import ApiPrice, GpuPrice, PriceTable, Projection, Sample, project
from pipeline.errors import ConfigError, MissingDependencyError, yaml_position
from pipeline.io import cast_to_plan
from pipeline.plan import plan_job
from pipeline.runner import run_job

log = logs.get("bench")


class PriceRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    gpu: str | None = None
    api: str | None = None


class Profile(BaseModel):
    """One entry of ``backends.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    job: dict[str, Any]
    """Job keys that replace the job's own."""
    price: PriceRef | None = None

    def apply(self, job: JobConfig, sample: Path, output: Path, keep: list[str]) -> JobConfig:
        """The job as this profile runs it on the sample. A profile that switches the backend
        leaves the old backend's section behind (it is checked, and unused)."""
        changes = {**self.job, "input": str(sample), "output": str(output), "keep_columns": keep}
        changes["cache"] = {"enabled": False}  # measure the backend, not yesterday's answers
        return job.with_changes(**changes)

    @property
    def price_ids(self) -> list[str]:
        """The price-table ids this backend is priced by (none for an unpriced profile)."""
        return [p for p in (self.price.gpu, self.price.api) if p] if self.price else []


def load_profiles(path: str | Path) -> dict[str, Profile]:
    path = Path(path)
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
    pieces, offset, w = [], 0, 0
    for f in plan.files:
        pf = pq.ParquetFile(f.path)
        for gi, n in enumerate(f.row_group_rows):
            take = []
            while w < len(wanted) and wanted[w] < offset + n:
                take.append(wanted[w] - offset)
                w += 1
            if take:  # only row groups holding sampled rows are read: memory stays bounded
                piece = pf.read_row_group(gi, columns=columns).take(pa.array(take))
                pieces.append(cast_to_plan(f, piece))  # input files may differ in type width
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
) -> dict:
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

    results: dict[str, dict] = {}
    labels: dict[str, list] = {}
    gold = None
    for name in backends:
        profile_job = profiles[name].apply(job, sample_path, out_dir / "runs" / name, keep)
        log.info("[%s] running %d rows on %s / %s", name, n, profile_job.backend, profile_job.model)
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
        results[name] = {
            "backend": profile_job.backend,
            "model": profile_job.model,
            "rows": summary["rows_done"],
            "status_counts": summary["status_counts"],
            "input_tokens": summary["prompt_tokens"],
            "cached_tokens": summary["cached_tokens"],
            "output_tokens": summary["output_tokens"],
            "labelling_seconds": summary["labelling_seconds"],
            "wall_seconds": summary["this_invocation"]["wall_seconds"],
            "items_per_second": round(summary["rows_done"] / seconds, 2) if seconds >= 0.01 else None,
            "retries": summary["retries"],
        }

    projections = []
    for name in backends:
        measured = _sample(results[name])
        for price_id in profiles[name].price_ids:
            price = prices.get(price_id)
            label = f"{name} (time x {price_id} $/h)" if isinstance(price, GpuPrice) else name
            projections.append(_row(label, project(measured, price, target_rows), estimate=False))
    reference = next(
        (b for b in backends if results[b]["input_tokens"] and results[b]["backend"] != "fake"), None
    )
    if price_apis and reference:
        measured = _sample(results[reference])
        for price_id in price_apis:
            price = prices.get(price_id)
            projections.append(
                _row(f"{price_id} (tokens of {reference})", project(measured, price, target_rows), True)
            )
            if isinstance(price, ApiPrice) and price.batch_discount:
                batch = project(measured, price, target_rows, batch=True)
                projections.append(_row(f"{price_id} batch API (tokens of {reference})", batch, True))

    machine = _machine()
    notes = [
        "Self-hosted cost = measured labelling time on this machine x the stated GPU's $/hour "
        "(the GPU named in the profile); engine start-up is not included.",
        "API cost = measured tokens x the price table (prices.yaml; check each as_of date).",
        "Rows marked estimate use another backend's token counts (tokenizers differ) and were not "
        "called, so their speed is unknown.",
        "Projections scale linearly with rows; hours assume the sample's parallelism.",
    ]
    if machine["gpu"] is None:
        notes.insert(
            0,
            "This machine has no GPU: self-hosted rows price CPU time at a GPU's hourly rate, which "
            "says nothing about what that GPU would take. Run the bench on the GPU you would rent.",
        )
    report = {
        "job": job.name,
        "sample_rows": n,
        "target_rows": target_rows,
        "seed": seed,
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
        r["rows"], r["input_tokens"], r["cached_tokens"], r["output_tokens"], r["labelling_seconds"]
    )


def _row(name: str, p: Projection, estimate: bool) -> dict:
    row = asdict(p)
    row.update({"name": name, "estimate": estimate, "price_id": p.backend})
    if estimate:
        row["target_hours"] = None  # the API was not called: its speed was not measured
    return row


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
        "| backend | model | items/s | in tok/item | cached tok/item | out tok/item | ok | other | retries |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, r in report["backends"].items():
        rows = max(r["rows"], 1)
        counts = r["status_counts"]
        other = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "ok" and v) or "-"
        speed = f"{r['items_per_second']:.2f}" if r["items_per_second"] is not None else "-"
        lines.append(
            f"| {name} | {r['model']} | {speed} | {r['input_tokens'] / rows:.1f} | "
            f"{r['cached_tokens'] / rows:.1f} | {r['output_tokens'] / rows:.1f} | {counts.get('ok', 0)} | "
            f"{other} | {r['retries']} |"
        )
    lines += [
        "",
        f"## Cost, projected to {report['target_rows']:,} items",
        "",
        "| backend | kind | $ per 1M items | projected $ | projected hours | price as of | price checked |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for p in report["projections"]:
        name = p["name"] + (" *(estimate)*" if p["estimate"] else "")
        hours = f"{p['target_hours']:,.1f}" if p["target_hours"] is not None else "-"
        lines.append(
            f"| {name} | {p['kind']} | {p['usd_per_million_items']:,.2f} | {p['target_usd']:,.0f} | "
            f"{hours} | {p['price_as_of']} | {'yes' if p['price_verified'] else 'no'} |"
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


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "the bench chart needs matplotlib",
            hint="pip install 'labelmill[bench]', or pass --no-charts for the report without it",
        ) from None


def chart(report: dict, path: Path) -> None:
    """Two bar charts a person can put on a slide: $ per 1M items, and hours for the projection."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["projections"]
    if not rows:
        fig, ax = plt.subplots(figsize=(8, 2))
        ax.text(0.5, 0.5, "no priced backend in this bench", ha="center", va="center")
        ax.axis("off")
        fig.savefig(path, dpi=150)
        plt.close(fig)
        return
    names = [r["name"] + (" (est.)" if r["estimate"] else "") for r in rows]
    colors = ["#2b7a78" if r["kind"] == "self-hosted" else "#c05746" for r in rows]
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
        f"GPU: {m['gpu'] or 'none'}; green = self-hosted, red = API)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
