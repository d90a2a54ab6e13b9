"""Strategies for big label sets (``strategy: shortlist | hierarchical``) on the test double.

Checked: every ``ok`` label is one of its row's own candidates and rows in equal rows out; a walk
down a taxonomy never ends under a node the row did not choose, and passes single-option levels
without a call; ``flat`` is refused before any model work when the labels can't fit; the prompt,
the fingerprint and the answer store follow the strategy; eval reports recall@k of the candidates.
The real engine's side is ``tests/test_vllm_strategies.py``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import yaml
from click.testing import CliRunner

from pipeline.backends.fake import FakeBackend
from pipeline.cli import main
from pipeline.config import load_job
from pipeline.errors import ConfigError, PromptError
from pipeline.labels import Taxonomy
from pipeline.plan import make_backend, plan_job
from pipeline.runner import run_job
from pipeline.strategies import Hierarchical, Shortlist, example_pairs

REPO = Path(__file__).resolve().parents[1]
WANDS = REPO / "sample_data" / "wands_queries.parquet"
CLASSES = REPO / "sample_data" / "wands" / "classes.txt"
EXAMPLES = REPO / "sample_data" / "wands" / "examples.parquet"
SHOPIFY = REPO / "sample_data" / "shopify-taxonomy" / "categories.en.txt"
CHOICES_PROMPT = "classify_keyword_choices.en"
TREE = [
    "Food",
    "Food > Drinks",
    "Food > Drinks > Coffee",
    "Food > Drinks > Tea",
    "Food > Drinks > Tea > Green Tea",
    "Food > Snacks",
    "Food > Snacks > Chips",
    "Home",
    "Home > Kitchen",
    "Home > Kitchen > Kettles",
    "Home > Kitchen > Mugs",
    "Home > Garden",
]


def _wands(tmp_path: Path, rows: int = 60) -> Path:
    path = tmp_path / "queries.parquet"
    pl.read_parquet(WANDS).head(rows).write_parquet(path)
    return path


def _job(tmp_path: Path, name: str = "job", **overrides) -> Path:
    spec = {
        "input": str(_wands(tmp_path)),
        "output": str(tmp_path / name / "run"),
        "id_column": "query_id",
        "text_column": "query",
        "keep_columns": ["query_id", "query", "query_class"],
        "labels_file": str(CLASSES),
        "strategy": "shortlist",
        "shortlist": {"k": 5, "retrievers": ["lexical"]},
        "prompt": CHOICES_PROMPT,
        "prompt_vars": {"shop": "a home goods store"},
        "model": "fake",
        "backend": "fake",
        "chunk_rows": 25,
    }
    spec.update(overrides)
    spec = {k: v for k, v in spec.items() if v is not None}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _parts(run: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted((run / "parts").glob("*.parquet")))


def test_every_ok_label_is_one_of_its_rows_candidates(tmp_path, labelmill_home):
    shortlist = {"k": 5, "retrievers": ["lexical", "examples"], "examples_file": str(EXAMPLES),
                 "examples_text_column": "query", "examples_label_column": "query_class"}  # fmt: skip
    job = _job(tmp_path, shortlist=shortlist)
    summary = run_job(load_job(job))
    out = _parts(tmp_path / "job" / "run")
    assert summary["complete"] and out.height == 60  # rows in == rows out
    assert out["status"].unique().to_list() == ["ok"]
    labels = set(CLASSES.read_text().splitlines())
    assert out["label"].is_in(list(labels)).all()
    assert out.select(pl.col("candidates").list.contains(pl.col("label"))).to_series().all()
    sizes = out["candidates"].list.len()
    assert sizes.min() >= 5 and sizes.max() <= 10  # k of each retriever, merged without repeats
    assert out["candidates"].list.eval(pl.element().is_duplicated().any()).explode().not_().all()
    # the shared instructions come first, the row's candidates and text after: far below the flat prompt
    assert out["prompt_tokens"].max() < 200


def test_a_shortlist_answer_outside_its_rows_candidates_is_invalid(tmp_path, labelmill_home):
    plan = plan_job(load_job(_job(tmp_path)))
    labels = plan.task.labels
    table = FakeBackend().answer(
        plan.prompt, pl.Series(["a", "b"]), plan.request, choices=[labels[:3], labels[3:6]]
    )
    moved = table.set_column(0, "text", pa.array([labels[0], labels[0]]))  # row 2 never had labels[0]
    parsed = plan.task.parse_answers(moved, pa.array([False, False]))
    assert parsed.column("status").to_pylist() == ["ok", "invalid"]
    assert "not one of the row's options" in parsed.column("error")[1].as_py()


def test_changing_k_retrievers_or_the_examples_file_never_reuses_answers(tmp_path, labelmill_home):
    examples = tmp_path / "examples.parquet"
    pl.read_parquet(EXAMPLES).write_parquet(examples)
    base = {"k": 5, "retrievers": ["lexical", "examples"], "examples_file": str(examples),
            "examples_text_column": "query", "examples_label_column": "query_class"}  # fmt: skip

    def namespace(**changes) -> str:
        return plan_job(load_job(_job(tmp_path, shortlist={**base, **changes}))).namespace

    first = namespace()
    assert namespace(k=6) != first
    assert namespace(retrievers=["lexical"]) != first
    assert namespace(neighbours=10) != first
    assert namespace(embedding_device="cpu") == first  # where vectors are computed changes no answer
    pl.read_parquet(EXAMPLES).head(100).write_parquet(examples)  # same name, other content
    assert namespace() != first
    flat = plan_job(load_job(_job(tmp_path, strategy="flat", prompt="classify_keyword.en"))).namespace
    assert flat != first
    # a flat job keeps the fingerprint it had before strategies existed: no shortlist key in it
    spec = plan_job(load_job(_job(tmp_path, strategy="flat", prompt="classify_keyword.en"))).task.describe()
    assert "strategy" not in spec and "shortlist" not in spec


def test_the_second_run_reuses_the_cache_and_the_first_runs_answers_become_examples(tmp_path, labelmill_home):
    from pipeline.cache import ResultCache

    shortlist = {"k": 5, "retrievers": ["lexical", "examples"], "examples_min_confidence": 0.0}
    job = load_job(_job(tmp_path, shortlist=shortlist))
    first = run_job(job)
    assert first["complete"]
    plan = plan_job(job)
    store = ResultCache(job.cache.path or labelmill_home / "cache", plan.namespace)
    texts, labels = example_pairs(plan.task, store)
    store.close()
    out = _parts(tmp_path / "job" / "run")
    assert sorted(zip(texts, labels, strict=True)) == sorted(zip(out["query"], out["label"], strict=True))
    again = run_job(load_job(_job(tmp_path, name="again", shortlist=shortlist)))
    assert again["cache_hits"] == 60 and again["model_calls"] == 0
    assert _parts(tmp_path / "again" / "run")["candidates"].equals(out["candidates"])


def test_an_examples_only_shortlist_without_examples_is_refused(tmp_path, labelmill_home):
    job = load_job(_job(tmp_path, shortlist={"retrievers": ["examples"]}))
    with pytest.raises(ConfigError, match="no labelled texts"):
        run_job(job)


def test_flat_on_ten_thousand_categories_is_refused_before_any_model_work(tmp_path, labelmill_home):
    job = load_job(
        _job(
            tmp_path, labels_file=str(SHOPIFY), strategy="flat", shortlist=None, fake={"max_model_len": 4096}
        )
    )
    with pytest.raises(ConfigError) as refused:
        run_job(job)
    message = refused.value.message + " " + refused.value.hint
    tokens = int(message.split("the prompt alone takes ")[1].split()[0])
    assert tokens > 100_000  # the 10,281 paths
    assert "strategy: shortlist" in message and "strategy: hierarchical" in message
    assert not (tmp_path / "job" / "run" / "run.json").exists()  # nothing recorded for the refused job


def test_flat_generation_past_the_constraint_engines_limit_is_refused(tmp_path, labelmill_home):
    job = load_job(_job(tmp_path, labels_file=str(SHOPIFY), strategy="flat", decoding="constrained"))
    with pytest.raises(ConfigError, match="at most 2000 labels") as refused:
        plan_job(job)
    assert "strategy: shortlist" in refused.value.hint


def test_shortlist_prompt_tokens_are_a_small_share_of_flat(tmp_path, labelmill_home):
    job = load_job(_job(tmp_path, labels_file=str(SHOPIFY), shortlist={"k": 10, "retrievers": ["lexical"]}))
    plan = plan_job(job)
    backend = make_backend(plan)
    rows = pl.read_parquet(WANDS)["query"].head(5).to_list()
    candidates = Shortlist(
        plan.task.labels, lambda: __import__("pipeline.strategies").strategies.build_retrievers(plan.task), 10
    ).candidates(rows)
    for text, mine in zip(rows, candidates, strict=True):
        shortlisted = backend.prompt_tokens(plan.prompt.messages(text, mine))
        flat = backend.prompt_tokens(plan.prompt.messages(text, plan.task.labels))
        assert shortlisted * 20 <= flat


def test_a_template_listing_every_label_is_refused_for_a_shortlist(tmp_path, labelmill_home):
    with pytest.raises(PromptError, match="lists the whole label set"):
        plan_job(load_job(_job(tmp_path, prompt="classify_keyword.en")))


def test_a_choices_template_serves_flat_with_every_label(tmp_path, labelmill_home):
    plan = plan_job(load_job(_job(tmp_path, strategy="flat")))
    assert not plan.prompt.row_choices
    user = plan.prompt.messages("oak desk")[1]["content"]
    assert "- Accent Chairs\n" in user and user.endswith("Keyword: oak desk")


def test_batch_files_refuse_a_shortlist(tmp_path, labelmill_home):
    with pytest.raises(ConfigError, match="batch files carry one label set"):
        plan_job(load_job(_job(tmp_path)), batch_files=True)


class Recording(FakeBackend):
    """The test double, recording every call's options and answers."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[list[str], list[tuple[str, ...]], list[str]]] = []

    def answer(self, prompt, texts, request, choices=None):
        table = super().answer(prompt, texts, request, choices)
        self.calls.append((texts.to_list(), [tuple(c) for c in choices], table.column("text").to_pylist()))
        return table


@pytest.mark.parametrize("leaves_only", [False, True])
def test_no_row_ends_under_a_node_it_did_not_choose(tmp_path, labelmill_home, leaves_only):
    tree = Taxonomy(TREE, leaves_only=leaves_only)
    job = _job(tmp_path, labels=TREE, labels_file=None, strategy="hierarchical", shortlist=None,
               assign="leaf" if leaves_only else "any", prompt="classify_product_choices.en",
               prompt_vars=None)  # fmt: skip
    plan = plan_job(load_job(job))
    backend = Recording()
    texts = pl.Series([f"item {i}" for i in range(200)])
    table = Hierarchical(plan.task.tree).answer(backend, plan.prompt, texts, plan.request)
    chosen: dict[str, list[str]] = {t: [] for t in texts}
    for asked, options, answers in backend.calls:
        for text, offered, answer in zip(asked, options, answers, strict=True):
            here = chosen[text][-1] if chosen[text] else None
            assert list(offered) == tree.options(here)  # offered: the children of what it chose above
            assert answer in offered
            chosen[text].append(answer)
    finals = table.column("text").to_pylist()
    levels = table.column("levels").to_pylist()
    for text, final, walked in zip(texts, finals, levels, strict=True):
        path = [x["text"] for x in walked]
        assert (
            path[-1] == final
            and final in TREE
            and path == [" > ".join(final.split(" > ")[:n]) for n in range(1, len(path) + 1)]
        )
        for above, below in itertools.pairwise(path):
            assert below == above or below.startswith(above + " > ")  # never a jump sideways
        assert set(chosen[text]) <= set(path)  # every asked choice is on the final path
        if leaves_only:
            assert tree.final(final)
    assert len(set(finals)) > 3  # the double spreads rows over the tree
    # "Home > Garden" and "Food > Snacks > Chips" are reached without a call for their last level
    assert all(len(options) > 1 for _, offered, _ in backend.calls for options in offered)


def test_a_hierarchical_run_keeps_each_levels_confidence(tmp_path, labelmill_home):
    job = _job(tmp_path, labels=TREE, labels_file=None, strategy="hierarchical", shortlist=None,
               prompt="classify_product_choices.en", prompt_vars=None)  # fmt: skip
    assert run_job(load_job(job))["complete"]
    out = _parts(tmp_path / "job" / "run")
    assert out.height == 60 and (out["status"] == "ok").all()
    for row in out.iter_rows(named=True):
        assert len(row["level_confidences"]) == len(row["label_path"])
        assert np.prod(row["level_confidences"]) == pytest.approx(row["confidence"])


def test_hierarchical_needs_levels(tmp_path, labelmill_home):
    job = _job(tmp_path, strategy="hierarchical", shortlist=None)
    with pytest.raises(ConfigError, match="no levels"):
        plan_job(load_job(job))


def test_eval_reports_recall_of_the_candidates(tmp_path, labelmill_home):
    from pipeline.evaluation import evaluate

    job = load_job(_job(tmp_path, shortlist={"k": 5, "retrievers": ["lexical"]}))
    run_job(job)
    report = evaluate(tmp_path / "job" / "run", WANDS, on="query_id", gold_column="query_class", charts=False)
    out = _parts(tmp_path / "job" / "run")
    offered = out.select(pl.col("candidates").list.contains(pl.col("query_class"))).to_series()
    shortlist = report["classification"]["shortlist"]
    assert shortlist["recall"] == pytest.approx(offered.mean())
    assert [x["k"] for x in shortlist["recall_at"]] == [1, 3, 5]
    assert report["run"]["strategy"] == "shortlist" and report["run"]["retrievers"] == ["lexical"]
    assert report["run"]["prompt_tokens_per_row"] > 0
    text = (tmp_path / "job" / "run" / "eval" / "eval.md").read_text()
    assert "Strategy: shortlist (retrievers lexical, k 5 each)" in text and "recall@k" in text


def test_validate_shows_each_retrievers_candidates_and_the_flat_token_count(tmp_path, labelmill_home):
    job = _job(tmp_path, labels_file=str(SHOPIFY), shortlist={"k": 4, "retrievers": ["lexical"]})
    result = CliRunner().invoke(main, ["validate", str(job), "--rows", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.count("candidates (lexical): ") == 2 and result.output.count("\nmerged: ") == 2
    counts = [line for line in result.output.splitlines() if line.startswith("--- prompt")]
    mine = int(counts[0].split("(")[1].split()[0])
    flat = int(counts[0].split("listed: ")[1].split()[0])
    assert mine * 20 <= flat


def test_each_levels_option_sets_are_calibrated_with_content_free_prompts_showing_them(
    tmp_path, labelmill_home
):
    job = _job(tmp_path, labels=TREE, labels_file=None, strategy="hierarchical", shortlist=None,
               prompt="classify_product_choices.en", prompt_vars=None)  # fmt: skip
    plan = plan_job(load_job(job))
    assert plan.request.calibrate  # the default for a walk down a taxonomy
    seen = []

    class Scoring(FakeBackend):
        def score(self, conversations, request, choices=None, neutral=()):
            if choices is not None:  # (the double then scores row by row, without choices)
                seen.append((choices, neutral))
            return super().score(conversations, request, choices, neutral)

    texts = pl.Series([f"item {i}" for i in range(40)])
    Hierarchical(plan.task.tree).answer(Scoring(), plan.prompt, texts, plan.request)
    assert seen
    for choices, neutral in seen:
        assert len(set(choices)) == 1 and len(neutral) == 3  # one set per call, three neutral prompts
        shown = "\n".join(f"- {option}" for option in choices[0])
        assert all(shown in n[-1]["content"] for n in neutral)
    shortlist = plan_job(load_job(_job(tmp_path, name="short")))
    assert not shortlist.request.calibrate  # a set per row: not calibrated unless asked, and refused if asked
    with pytest.raises(Exception, match="content_free"):
        load_job(_job(tmp_path, name="short2", score_calibration="content_free"))
