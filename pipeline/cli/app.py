"""The ``labelmill`` group and what its commands share: error handling at the edge, and logging."""

from __future__ import annotations

import functools
import logging
import sys

import click

from pipeline import __version__, logs
from pipeline.errors import LabelmillError, OutputError

EXIT_ROW_ERRORS = 6
INTERRUPTED = "interrupted: finished chunks are kept; rerun the same command to resume"
log = logs.get("cli")


def domain_errors(fn):
    """Turn labelmill's errors into a message and the error's exit code. With JSON logs the message
    is a log record too, so a log collector's stream stays one JSON object per line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LabelmillError as exc:
            if json_logs():
                log.error(exc.message, extra=logs.fields("error", exit_code=exc.exit_code, hint=exc.hint))
            else:
                click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            # The disk or the file system said no somewhere nobody expected (full, read-only,
            # a file removed under the run): a message and the output error's exit code, with
            # finished chunks kept, is more use than a traceback.
            where = f" ({exc.filename})" if exc.filename else ""
            message = f"{exc.strerror or exc}{where}"
            hint = "check free disk space and permissions; finished chunks are kept, rerun to resume"
            if json_logs():
                log.error(message, extra=logs.fields("error", exit_code=OutputError.exit_code, hint=hint))
            else:
                click.secho(f"error: {message}\n  -> {hint}", fg="red", err=True)
            sys.exit(OutputError.exit_code)
        except KeyboardInterrupt:
            if json_logs():
                log.warning(INTERRUPTED, extra=logs.fields("interrupted", exit_code=130))
            else:
                click.secho(INTERRUPTED, err=True)
            sys.exit(130)

    return wrapper


def job_options(fn):
    """``--set KEY=VALUE`` and ``--date``: what a scheduler's one command changes night by night."""
    fn = click.option(
        "--date",
        default=None,
        metavar="YYYY-MM-DD",
        help="The date {date} in the job's output: stands for (default: today, local time).",
    )(fn)
    return click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a job key for this command; a dotted key reaches into a section "
        "(--set api.timeout_s=30); the value is read as YAML. Repeatable.",
    )(fn)


def echo(message: str) -> None:
    """A line for the person at the terminal (stderr), outside the log; none with JSON logs."""
    if not json_logs():
        click.echo(message, err=True)


def json_logs() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().meta.get("labelmill.log_format") == "json")


@click.group()
@click.version_option(__version__, prog_name="labelmill")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="LABELMILL_LOG_FORMAT",
    help="Log lines on stderr: timestamped text, or one JSON object per line for log collectors "
    "(then no progress bar and no summary table).",
)
@click.option("-v", "--verbose", is_flag=True, help="Also log each retried request.")
@click.pass_context
def main(ctx: click.Context, log_format: str, verbose: bool) -> None:
    """Label Parquet rows with a small open model: keyword or product -> category."""
    ctx.meta["labelmill.log_format"] = log_format
    logs.setup(log_format, logging.DEBUG if verbose else logging.INFO)
