"""``labelmill run | validate | status | export | import``: a job and its run folder."""

from __future__ import annotations

import json
import signal
import sys

import click

from pipeline.cli.app import EXIT_ROW_ERRORS, domain_errors, echo, job_options, json_logs, main


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--restart", is_flag=True, help="Delete this run folder's finished parts and start over.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default=None,
    help="Where chunks are labelled [default: the job's executor:, local].",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Neither read nor write the shared result cache; the run still asks each distinct text once.",
)
@job_options
@domain_errors
def run(
    job_file: str,
    restart: bool,
    quiet: bool,
    executor: str | None,
    no_cache: bool,
    sets: tuple[str, ...],
    date: str | None,
) -> None:
    """Run a job; rerunning the same command resumes where it stopped."""
    from pipeline.config import load_job
    from pipeline.runner import run_job

    # A scheduler's SIGTERM unwinds like Ctrl-C, so the engine is shut down and the lock released.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    job = load_job(job_file, sets=sets, date=date)
    if no_cache:
        job = job.model_copy(update={"cache": job.cache.model_copy(update={"enabled": False})})
    if executor is not None:
        job = job.model_copy(update={"executor": executor})
    progress = not quiet and not json_logs() and sys.stderr.isatty()
    finish(run_job(job, restart=restart, progress=progress))


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--rows", default=3, show_default=True, help="How many prompts to render.")
@job_options
@domain_errors
def validate(job_file: str, rows: int, sets: tuple[str, ...], date: str | None) -> None:
    """Check a job without loading a model: inputs, labels, prompt, model, token counts."""
    from pipeline.cascade import describe as describe_cascade
    from pipeline.config import load_job
    from pipeline.contracts import SCORE
    from pipeline.errors import BackendUnavailableError
    from pipeline.io import read_chunk
    from pipeline.plan import make_backend, plan_job, text_budget
    from pipeline.text import row_texts

    plan = plan_job(load_job(job_file, sets=sets, date=date))
    job = plan.job
    backend = make_backend(plan)
    # Refused before "ok", as run would die on them before its first answer: a model whose
    # tokenizer isn't on this machine, a prompt that can't fit the model's context. Only a missing
    # tokenizer library (validating on a machine without the engine) leaves the counts out.
    try:
        budget = text_budget(plan, backend)
        limit, source = backend.max_model_len, getattr(backend, "max_model_len_source", None)
        counted = [f"  context {limit} tokens" + (f" ({source})" if source else "")] if limit else []
        counted.append(f"  budget  row text up to {budget if budget else 'unlimited'} tokens")
    except BackendUnavailableError as exc:
        counted = [f"  tokens  not counted: {exc.message}"]
        backend = None
    echo(f"job {job_file}: ok")
    chunks = f"{len(plan.chunks)} chunk(s) of <= {job.chunk_rows}"
    echo(f"  input   {len(plan.files)} file(s), {plan.rows} rows, {chunks}")
    echo(f"  output  {job.output}")
    echo(f"  task    {job.task}")
    for heading, text in plan.task.lines():
        echo(f"  {heading:7} {text}")
    echo(f"  prompt  {job.prompt} (fingerprint {plan.prompt.fingerprint})")
    echo(f"  model   {job.model} -> {plan.model} (backend {job.backend})")
    if job.executor == "ray":
        r = job.ray
        where = r.address or "a Ray instance started for the run"
        echo(f"  executor ray: {r.engines} engine actor(s), {r.gpus_per_engine:g} GPU and "
             f"{r.cpus_per_engine:g} CPU each, on {where}")  # fmt: skip
    if job.cascade is not None:
        echo(f"  cascade {describe_cascade(plan)}")
    if job.escalate is not None:
        esc = job.escalate
        rule = [f"confidence under {esc.confidence_below}"] if esc.confidence_below is not None else []
        rule += [f"status {s}" for s in esc.statuses]
        echo(f"  escalate {esc.model} -> {plan.escalation.model} (backend {esc.backend}) for rows with "
             f"{' or '.join(rule)}")  # fmt: skip
    unused = [name for name in type(job.sections).model_fields if job.section(name) is not None]
    unused = [name for name in unused if name != plan.backend_class.section]
    if unused:
        echo(f"  note    section(s) {', '.join(unused)} belong to other backends: not used by {job.backend}")
    request = plan.request
    row_choices = plan.prompt.row_choices
    if row_choices:
        how = "scored" if request.decoding == SCORE else "generated"
        echo(f"  answer  {how} per row, among the row's own options")
    elif request.decoding == SCORE and backend is not None and plan.backend_class.loads_weights:
        echo(_trie_line(backend.label_trie(request.constraint.choice, plan.prompt.messages(""))))
    else:
        echo(f"  answer  at most {request.max_tokens} tokens")
    for line in counted:
        echo(line)
    if not plan.chunks:
        return
    first = plan.chunks[0]
    table = read_chunk(plan.files[first.file_index], first, plan.read_columns)
    texts = [t for t in row_texts(table.slice(0, 1000), job.text_column, job.text_template) if t][:rows]
    options = _row_options(plan, texts) if row_choices else [(None, {})] * len(texts)
    for n, (text, (choices, found)) in enumerate(zip(texts, options, strict=True), 1):
        messages = plan.prompt.messages(text, choices)
        shown = backend.render_chat(messages) if backend else messages
        count = f"{backend.prompt_tokens(messages)} tokens" if backend else "tokens not counted"
        if backend and row_choices:  # next to what every label in the prompt would take
            flat = backend.prompt_tokens(plan.prompt.messages(text, plan.task.labels))
            count += f"; with all {len(plan.task.labels)} labels listed: {flat} tokens"
        click.echo(f"--- prompt {n} ({count}) ---")
        for name, candidates in found.items():
            click.echo(f"{name}: {' | '.join(candidates) if candidates else '(none)'}")
        click.echo(shown if isinstance(shown, str) else json.dumps(shown, ensure_ascii=False, indent=2))


def _row_options(plan, texts: list[str]) -> list[tuple[list[str], dict[str, list[str]]]]:
    """Each sample row's options as the first call shows them, and each retriever's candidates."""
    from pipeline.strategies import Shortlist, make_strategy

    strategy = make_strategy(plan)  # validate reads no cache: the examples file only
    if isinstance(strategy, Shortlist):
        merged = strategy.candidates(texts)
        each = strategy.by_retriever(texts)
        return [
            (m, {**{f"candidates ({name})": found[i] for name, found in each.items()}, "merged": m})
            for i, m in enumerate(merged)
        ]
    first = plan.task.tree.options(None)
    return [(first, {"level 1 options": first}) for _ in texts]


def _trie_line(trie) -> str:
    """How many decode steps scoring takes: the trie's depth, and which rows each later step asks."""
    steps = trie.steps()
    first = len(trie.skip(trie.root).children)
    line = f"  answer  scored in at most {len(steps)} step(s); step 1 asks every row ({first} first tokens"
    line += f" for {len(trie.labels)} labels)"
    if len(steps) > 1:
        deep = ", ".join(str(n) for n in steps[1:])
        line += (
            f"; steps 2-{len(steps)} ask only rows whose likeliest prefix is shared by several labels "
            f"(at worst every row; labels that deep: {deep})"
        )
    return line


@main.command()
@click.argument("run_folder", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@domain_errors
def status(run_folder: str, as_json: bool) -> None:
    """Progress of a run folder: chunks, rows, errors, throughput, ETA."""
    from pipeline.errors import RunStateError
    from pipeline.runfolder import RunFolder

    folder = RunFolder(run_folder)
    manifest = folder.manifest()
    if manifest is None:
        raise RunStateError(f"{run_folder} is not a labelmill run folder (no run.json)")
    summary = folder.summarise(manifest)
    errors = summary["status_counts"].get("error", 0)
    if folder.is_locked():
        state = "running"
    elif not summary["complete"]:
        state = "stopped"
    else:
        state = "finished_with_errors" if errors else "finished"
    summary["state"] = state
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    said = {
        "finished_with_errors": f"finished with {errors} error row(s): rerun the job to retry them",
        "stopped": "stopped: rerun the job to resume",
    }.get(state, state)
    click.echo(f"{run_folder}: {said}")
    print_summary(summary, to_err=False)


def finish(summary: dict) -> None:
    """Print a finished run's summary; exit 6 if some rows have no valid answer."""
    if not json_logs():  # the JSON log already carries the summary as one record
        print_summary(summary)
    counts = summary["status_counts"]
    if counts.get("error") or counts.get("invalid"):
        sys.exit(EXIT_ROW_ERRORS)


def print_summary(s: dict, to_err: bool = True) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in s["status_counts"].items())
    rate = s["rows_per_second"]
    student = f"{s['student_labels']} from the student, " if s.get("student_labels") else ""
    lines = [
        f"chunks  {s['chunks_done']}/{s['chunks_total']}",
        f"rows    {s['rows_done']}/{s['rows_total']} ({counts})",
        f"tokens  {s['prompt_tokens']} in ({s.get('cached_tokens', 0)} cached), {s['output_tokens']} out",
        f"answers {s.get('model_calls', 0)} from the model, {student}{s.get('cache_hits', 0)} from the "
        f"cache, {s.get('duplicates', 0)} rows shared a duplicate's answer; {s.get('retries', 0)} retries",
    ]
    lines += _route_lines(s)
    lines.append(f"speed   {rate if rate else '-'} rows/s over {s['labelling_seconds']} s of labelling")
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


_SOURCE_ORDER = ("model", "student", "cache", "duplicate", "escalated")


def _route_lines(s: dict) -> list[str]:
    """Where the rows' answers came from, and what the cascade and the escalation did: printed
    only for jobs that route rows, so that other runs read as they always have."""
    lines = []
    sources = s.get("rows_by_source")
    if sources:
        # a source this version does not know still counts rows, so it is shown after the known ones
        order = [*_SOURCE_ORDER, *sorted(set(sources) - set(_SOURCE_ORDER))]
        counts = ", ".join(f"{k} {sources[k]}" for k in order if sources.get(k))
        lines.append(f"sources  {counts or '-'}")
    cascade = s.get("cascade")
    if cascade:
        lines.append(f"cascade  {_cascade_line(cascade)}")
    if s.get("escalations"):
        lines.append(
            f"escalated  {s['escalations']} texts to the second backend "
            f"({s.get('escalation_calls', 0)} asked now, rest from its cache)"
        )
    return lines


def _cascade_line(c: dict) -> str:
    target = _num(c.get("target_agreement"), "g")
    if c.get("threshold") is None:
        why = f" ({c['why_no_threshold']})" if c.get("why_no_threshold") else ""
        return f"the student could not meet agreement {target}{why}: every row went to the model"
    rows = (c.get("rows_by_source") or {}).get("student", 0)
    return (
        f"student {c.get('student_kind') or '?'} ({c.get('chosen') or '?'}): threshold "
        f"{_num(c['threshold'], '.3f')}, answered {rows} rows ({c.get('student_share') or 0:.1%}); "
        f"held-out agreement {_num(c.get('agreement_estimate'), '.3f')}, lower bound "
        f"{_num(c.get('agreement_bound'), '.3f')} at delta {_num(c.get('delta'), 'g')} (target {target}); "
        f"{c.get('model_calls_saved', 0)} model calls saved"
    )


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@main.command("export")
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--max-requests", default=50_000, show_default=True, help="Requests per file.")
@click.option("--max-mb", default=200, show_default=True, help="Megabytes per file.")
@click.option(
    "--no-cache", is_flag=True, help="Write requests for texts the result cache already answers, too."
)
@job_options
@domain_errors
def export_cmd(
    job_file: str,
    out_dir: str,
    max_requests: int,
    max_mb: int,
    no_cache: bool,
    sets: tuple[str, ...],
    date: str | None,
) -> None:
    """Write the requests a job still needs as batch JSONL (OpenAI Batch API, vllm run-batch)."""
    from pipeline.batchfiles import export_job
    from pipeline.config import load_job

    job = load_job(job_file, sets=sets, date=date)
    if no_cache:
        job = job.model_copy(update={"cache": job.cache.model_copy(update={"enabled": False})})
    result = export_job(job, out_dir, max_requests, max_mb * 1024 * 1024)
    click.echo(f"{result['requests']} requests for {result['rows']} rows in {len(result['files'])} file(s):")
    for name in result["files"]:
        click.echo(f"  {result['folder']}/{name}")
    click.echo(
        f"not requested: {result['texts_answered_by_cache']} texts the cache answers, "
        f"{result['rows_sharing_a_duplicate']} rows sharing a duplicate's request, "
        f"{result['texts_already_requested']} texts requested by an earlier chunk, "
        f"{result['rows_in_finished_chunks']} rows in finished chunks"
    )
    if result["stale_files_removed"]:
        click.echo(
            f"removed {len(result['stale_files_removed'])} file(s) of an earlier export from {out_dir}"
        )


@main.command("import")
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option(
    "--restart",
    is_flag=True,
    help="Discard this run folder's parts first (after a job change); a row the files leave without "
    "an answer keeps the one it held for the same rows and answers.",
)
@job_options
@domain_errors
def import_cmd(
    job_file: str, results: tuple[str, ...], restart: bool, sets: tuple[str, ...], date: str | None
) -> None:
    """Read batch result JSONL files into the job's run folder, as if the job had run."""
    from pipeline.batchfiles import import_job
    from pipeline.config import load_job

    summary = import_job(load_job(job_file, sets=sets, date=date), list(results), restart=restart)
    done = summary["import"]
    echo(
        f"imported {done['imported_answers']} answers ({done['answers_used']} used); "
        f"{done['requests_without_answer']} request(s) had none, {done['failed_answers']} failed"
    )
    echo(
        f"rows: {done['rows_kept_earlier_answer']} kept an earlier answer, "
        f"{done['rows_without_answer']} have none (status error: labelmill run asks for them)"
    )
    finish(summary)
