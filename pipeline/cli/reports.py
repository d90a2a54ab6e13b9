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
@click.option(
    "--profiles",
    type=click.Path(dir_okay=False),
    help="Backend profiles file [default: the backends.yaml shipped with labelmill].",
)
@click.option(
    "--prices",
    type=click.Path(dir_okay=False),
    help="Price table [default: the prices.yaml shipped with labelmill].",
)
@click.option("--out", "out_dir", default=None, help="Report folder [default: out/bench-<job output name>].")
@click.option("--seed", default=0, show_default=True)
@click.option("--no-charts", is_flag=True, help="No bench.png (for machines without matplotlib).")
@click.option(
    "--no-dedupe-savings",
    is_flag=True,
    help="Price every projected row with text, as if no duplicate were collapsed and nothing cached "
    "[default: only the sample's measured share of rows that reached the model].",
)
@domain_errors
def bench_cmd(
    job_file, backends, sample_rows, target_rows, gold_column, price_apis, profiles, prices, out_dir, seed,
    no_charts, no_dedupe_savings,
):  # fmt: skip
    """Run one sample on several backends; report items/s, tokens, $ per 1M items, agreement.

    Engine output printed during the runs goes to stderr; stdout holds only the report."""
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
        dedupe_savings=not no_dedupe_savings,
    )
    click.echo((out / "bench.md").read_text())
    priced = sum(p["priced"] for p in report["projections"])
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
@click.option(
    "--gold-delimiter",
    default=None,
    help="Split text gold cells on this into label sets (multi-label gold) [default: a list column is "
    "a set; text is split on '|' for a multi-label run, or where its values can't be single labels].",
)
@click.option(
    "--null-values",
    default="",
    help="Comma-separated gold tokens meaning 'no value', e.g. n/a,none,- (case-insensitive): "
    "such rows are counted and not scored; such attribute values are not counted.",
)
@domain_errors
def eval_cmd(
    run_folder, gold_file, on, gold_column, out_dir, thresholds, no_charts, gold_delimiter, null_values
):
    """Score a run against gold answers: accuracy, F1, confusion, calibration; label sets (multi-label
    gold or runs); P/R/F1 per attribute."""
    from pipeline import storage
    from pipeline.errors import ConfigError
    from pipeline.evaluation import evaluate, parse_null_values, parse_thresholds

    if not out_dir and storage.is_remote(run_folder):
        raise ConfigError(
            f"{run_folder} is in an object store: the report is written to a local folder",
            hint="name it with --out (e.g. --out eval/run-name)",
        )
    out = Path(out_dir) if out_dir else Path(run_folder) / "eval"
    report = evaluate(
        run_folder,
        gold_file,
        on,
        gold_column,
        out,
        parse_thresholds(thresholds),
        charts=not no_charts,
        gold_delimiter=gold_delimiter,
        null_values=parse_null_values(null_values),
    )
    click.echo((out / "eval.md").read_text(encoding="utf-8"), nl=False)
    echo(f"report: {', '.join(str(out / name) for name in report['files'])}")
