"""Strategies for big label sets on the real vLLM engine (CPU build, SmolLM2-135M).

Checked: a shortlist row is scored over its own candidates only (its label and every label
probability are among them, and they sum to 1 over them); a taxonomy walked level by level asks
each row only about the children of the node it chose, and its answer lies on that path.

Skipped when vLLM or the checkpoint is missing (see ``engine_env``).
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest
import yaml
from engine_env import CHECKPOINT, ENGINE, needs_engine

from pipeline.config import load_job
from pipeline.plan import plan_job
from pipeline.runner import run_job
from pipeline.strategies import Hierarchical

pytestmark = needs_engine

REPO = Path(__file__).resolve().parents[1]
WANDS = REPO / "sample_data" / "wands_queries.parquet"
CLASSES = REPO / "sample_data" / "wands" / "classes.txt"
TITLES = REPO / "sample_data" / "oa_mine_shopify_300.parquet"
TREE = [
    "Food & Drink > Drinks > Coffee",
    "Food & Drink > Drinks > Tea",
    "Food & Drink > Breakfast > Cereal",
    "Food & Drink > Breakfast > Jam",
    "Health & Beauty > Oral Care > Toothbrushes",
    "Health & Beauty > Oral Care > Toothpaste",
    "Health & Beauty > Hair Care > Conditioner",
    "Health & Beauty > Hair Care > Shampoo",
    "Health & Beauty > Sun Care > Sunscreen",
    "Apparel > Shoes > Sneakers",
    "Apparel > Shoes > Sandals",
    "Apparel > Safety > Masks",
]


def _job(tmp_path: Path, spec: dict) -> Path:
    base = {
        "output": str(tmp_path / "run"), "model": str(CHECKPOINT), "backend": "vllm", "engine": ENGINE,
        "cache": {"enabled": False},
    }  # fmt: skip
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**base, **spec}, sort_keys=False))
    return path


def test_each_row_is_scored_over_its_own_candidates(tmp_path, engine):
    data = tmp_path / "in.parquet"
    pl.read_parquet(WANDS).head(24).write_parquet(data)
    job = _job(tmp_path, {
        "input": str(data), "id_column": "query_id", "text_column": "query", "keep_columns": ["query_id"],
        "labels_file": str(CLASSES), "strategy": "shortlist",
        "shortlist": {"k": 4, "retrievers": ["lexical"]},
        "label_probs": 4, "prompt": "classify_keyword_choices.en", "prompt_vars": {"shop": "a home store"},
        "chunk_rows": 24,
    })  # fmt: skip
    assert run_job(load_job(job), backend=engine)["complete"]
    out = pl.read_parquet(sorted((tmp_path / "run" / "parts").glob("*.parquet")))
    assert out.height == 24 and (out["status"] == "ok").all()
    seen = set()
    for row in out.iter_rows(named=True):
        candidates = row["candidates"]
        assert len(candidates) == 4 and row["label"] in candidates
        probs = {p["label"]: p["prob"] for p in row["label_probs"]}
        assert set(probs) == set(candidates)  # every candidate scored, nothing else
        assert math.fsum(probs.values()) == pytest.approx(1.0, abs=1e-6)
        assert probs[row["label"]] == pytest.approx(row["confidence"]) == max(probs.values())
        seen.add(tuple(candidates))
    assert len(seen) > 10  # rows really had sets of their own
    assert out["prompt_tokens"].max() < 200  # the 188 classes alone take over 1,000


def test_each_level_offers_only_the_children_of_the_node_chosen_above(tmp_path, engine, monkeypatch):
    job = _job(tmp_path, {
        "input": str(TITLES), "id_column": "id", "text_column": "title", "labels": TREE,
        "strategy": "hierarchical", "prompt": "classify_product_choices.en",
    })  # fmt: skip
    plan = plan_job(load_job(job))
    calls = []
    answer = engine.answer

    def recording(prompt, texts, request, choices=None):
        table = answer(prompt, texts, request, choices)
        calls.append((texts.to_list(), choices, table.column("text").to_pylist()))
        return table

    monkeypatch.setattr(engine, "answer", recording)
    texts = pl.read_parquet(TITLES)["title"][::15]  # 20 titles, 2 of each category
    table = Hierarchical(plan.task.tree).answer(engine, plan.prompt, texts, plan.request)
    assert len(calls) == 3  # one engine call per level, all rows at once
    chosen = {t: None for t in texts}
    for asked, options, answers in calls:
        for text, offered, picked in zip(asked, options, answers, strict=True):
            assert list(offered) == plan.task.tree.options(chosen[text])
            assert picked in offered
            chosen[text] = picked
    finals, walks = table.column("text").to_pylist(), table.column("levels").to_pylist()
    for text, final, levels in zip(texts, finals, walks, strict=True):
        node = chosen[text]
        while node != final:  # below the last choice: only levels with a single option, passed
            (node,) = plan.task.tree.options(node)
        assert final in TREE
        assert [x["text"] for x in levels] == [" > ".join(final.split(" > ")[:n]) for n in (1, 2, 3)]
        assert all(x["logprob"] <= 1e-9 for x in levels)
    logprobs = table.column("logprob").to_pylist()
    assert all(lp == pytest.approx(sum(x["logprob"] for x in lv)) for lp, lv in
               zip(logprobs, table.column("levels").to_pylist(), strict=True))  # fmt: skip
