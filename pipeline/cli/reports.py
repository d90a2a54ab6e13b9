"""``labelmill bench | eval``: what a job costs on several backends, and how right a run is."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.app import domain_errors, echo, main


@main.command("bench")
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--backends", required=True, help="Comma-separated profile names from --profiles.")
@click.option(
    "--sample", "sample_rows", default=2000, show_default=True, help="Rows to sample from the input."
)
@click.option(
    "--project", "target_rows", default=100_000_000, show_default=True, help="Rows to project costs to."
)
@click.option("--gold-column", default=None, help="Input column with the right labels, for accuracy.")
@click.option("--price-apis", default="", help="Price-table API ids to project from measured tokens.")
@click.option("--profiles", default="backends.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--prices", default="prices.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", default=None, help="Report folder [default: out/bench-<job output name>].")
@click.option("--seed", default=0, show_default=True)
@click.option("--no-charts", is_flag=True, help="No bench.png (for machines without matplotlib).")
@domain_errors
def bench_cmd(
    job_file, backends, sample_rows, target_rows, gold_column, price_apis, profiles, prices, out_dir, seed,
    no_charts,
):  # fmt: skip
    """Run one sample on several backends; report items/s, tokens, $ per 1M items, agreement."""
    from pipeline.bench import bench, load_profiles
    from pipeline.config import load_job
    from pipeline.costs import load_prices

    job = load_job(job_file)
    out = Path(out_dir or f"out/bench-{job.name}")
    report = bench(
        job,
        [b.strip() for b in backends.split(",") if b.strip()],
        load_profiles(profiles),
        load_prices(prices),
        out,
        sample_rows=sample_rows,
        target_rows=target_rows,
        gold_column=gold_column,
        price_apis=[p.strip() for p in price_apis.split(",") if p.strip()],
        seed=seed,
        charts=not no_charts,
    )
    click.echo((out / "bench.md").read_text())
    priced = len(report["projections"])
    files = ", ".join(f"{out}/{name}" for name in report["files"])
    click.echo(f"report: {files} ({priced} priced rows)")


@main.command("eval")
@click.argument("run_folder", type=click.Path(file_okay=False))
@click.option("--gold", "gold_file", required=True, help="Parquet or CSV file with the right answers.")
@click.option("--on", "on", required=True, help="Id column of the gold file (and of the run, if it has one).")
@click.option("--gold-column", default=None, help="Gold column [default: category; attributes for extract].")
@click.option("--out", "out_dir", default=None, help="Report folder [default: RUN_FOLDER/eval].")
@click.option("--thresholds", default="0.5,0.7,0.9", show_default=True, help="Confidence thresholds.")
@click.option("--no-charts", is_flag=True, help="No PNG pictures (for machines without matplotlib).")
@domain_errors
def eval_cmd(run_folder, gold_file, on, gold_column, out_dir, thresholds, no_charts):
    """Score a run against gold answers: accuracy, F1, confusion, calibration; P/R/F1 per attribute."""
    from pipeline.evaluation import evaluate, parse_thresholds

    out = Path(out_dir) if out_dir else Path(run_folder) / "eval"
    report = evaluate(
        run_folder, gold_file, on, gold_column, out, parse_thresholds(thresholds), charts=not no_charts
    )
    click.echo((out / "eval.md").read_text(encoding="utf-8"), nl=False)
    echo(f"report: {', '.join(str(out / name) for name in report['files'])}")
