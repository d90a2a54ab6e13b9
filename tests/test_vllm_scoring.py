"""Scored labels (``decoding: score``) on the real vLLM engine (CPU build, SmolLM2-135M).

Checked: every ``ok`` label is in the set and the label probabilities sum to 1 over it; a set
where labels start others (``Tea`` / ``Tea Set`` / ``Tea Tree Oil``) is resolved through the end of
the answer, and the ratio of two such labels' probabilities equals the ratio the model itself gives
to their next tokens (read independently, as prompt log-probabilities of the full paths); rows with
their own label sets are scored against their own set.

Skipped when vLLM or the checkpoint is missing (see ``engine_env``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from engine_env import CHECKPOINT, ENGINE, needs_engine

from pipeline.config import load_job
from pipeline.contracts import SCORE, Constraint, Request, Sampling
from pipeline.prompts import render
from pipeline.runner import run_job
from pipeline.tasks.classify import ClassifySettings, ClassifyTask

pytestmark = needs_engine

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "oa_mine_products.parquet"
PROMPT = REPO / "prompts" / "classify_product.en.yaml"
LABELS = ["Coffee", "Tea", "Vitamin", "Safety Mask", "Toothbrush", "Breakfast Cereal", "Sunscreen",
          "Laundry Detergent", "Shoes", "Conditioner"]  # fmt: skip
PREFIXED = ["Tea", "Tea Set", "Tea Tree Oil", "Coffee", "Coffee Maker"]


def _titles(n: int) -> list[str]:
    return pq.read_table(SAMPLE, columns=["title"]).column("title").to_pylist()[::37][:n]


def _conversations(labels: list[str], titles: list[str]):
    prompt = render(str(PROMPT), ClassifyTask(ClassifySettings(labels=labels)), {})
    return [prompt.messages(t) for t in titles]


def _request(labels: list[str], top: int) -> Request:
    return Request(Constraint(choice=tuple(labels)), 32, Sampling(), SCORE, top)


def _run(tmp_path: Path, engine, labels: list[str], rows: int) -> list[dict]:
    data = pa.table({"id": [f"r{i}" for i in range(rows)], "title": _titles(rows)})
    pq.write_table(data, tmp_path / "in.parquet")
    job = {
        "input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "run"), "id_column": "id",
        "text_column": "title", "labels": labels, "label_probs": len(labels), "decoding": "score",
        "prompt": str(PROMPT), "model": str(CHECKPOINT), "backend": "vllm", "engine": ENGINE,
        "chunk_rows": rows, "cache": {"enabled": False},
    }  # fmt: skip
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    summary = run_job(load_job(tmp_path / "job.yaml"), backend=engine)
    assert summary["complete"]
    return pq.read_table(sorted((tmp_path / "run" / "parts").glob("*.parquet"))).to_pylist()


def test_every_scored_label_is_in_the_set_and_the_set_sums_to_one(tmp_path, engine):
    rows = _run(tmp_path, engine, LABELS, 24)
    assert len(rows) == 24 and all(r["status"] == "ok" for r in rows)
    for row in rows:
        assert row["label"] in LABELS
        probs = row["label_probs"]
        assert sorted(p["label"] for p in probs) == sorted(LABELS)
        assert math.fsum(p["prob"] for p in probs) == pytest.approx(1.0, abs=1e-6)
        assert probs[0]["label"] == row["label"] and probs[0]["prob"] == pytest.approx(row["confidence"])
        assert max(p["prob"] for p in probs) == probs[0]["prob"]
        # these ten labels start with ten different tokens: one decode step per row
        assert row["output_tokens"] == 1
    assert len({round(r["confidence"], 6) for r in rows}) > 1  # real probabilities vary by row


def test_labels_that_start_other_labels_are_resolved_through_the_end_of_the_answer(tmp_path, engine):
    rows = _run(tmp_path, engine, PREFIXED, 6)
    assert all(r["status"] == "ok" and r["label"] in PREFIXED for r in rows)
    for row in rows:
        assert math.fsum(p["prob"] for p in row["label_probs"]) == pytest.approx(1.0, abs=1e-6)
        assert row["output_tokens"] >= 2  # every label shares its first token with another

    # The model's own next-token probabilities after "Tea", read as prompt log-probabilities of the
    # two full paths (no mask, nothing of the search): their ratio is P(Tea Set) / P(Tea).
    from vllm import SamplingParams

    conversations = _conversations(PREFIXED, _titles(6))
    paths = dict(zip(PREFIXED, engine.label_paths(PREFIXED, conversations[0]), strict=True))
    [end] = engine.end_tokens()
    tea, tea_set = paths["Tea"], paths["Tea Set"]
    assert tea_set[: len(tea)] == tea
    found = engine.score(conversations, _request(PREFIXED, len(PREFIXED)))
    for conversation, answer in zip(conversations, found, strict=True):
        prompt = engine._template_ids(conversation, generation=True)
        outs = engine._llm.generate(
            [{"prompt_token_ids": prompt + tea_set}, {"prompt_token_ids": prompt + tea + [end]}],
            SamplingParams(max_tokens=1, prompt_logprobs=0),
            use_tqdm=False,
        )
        next_set = outs[0].prompt_logprobs[len(prompt) + len(tea)][tea_set[len(tea)]].logprob
        next_end = outs[1].prompt_logprobs[len(prompt) + len(tea)][end].logprob
        scored = dict(answer.alternatives)
        assert scored["Tea Set"] - scored["Tea"] == pytest.approx(next_set - next_end, abs=2e-3)


def test_rows_with_their_own_label_sets_are_scored_against_their_own_set(engine):
    first, second = LABELS[:5], LABELS[5:]
    titles = _titles(6)
    conversations = _conversations(LABELS, titles)
    choices = [tuple(first), tuple(second)] * 3
    found = engine.score(conversations, _request(LABELS, 5), choices=choices)
    for answer, own in zip(found, choices, strict=True):
        assert answer.text in own
        assert {label for label, _ in answer.alternatives} == set(own)
        assert math.fsum(math.exp(lp) for _, lp in answer.alternatives) == pytest.approx(1.0, abs=1e-6)
    shared = engine.score(conversations[::2], _request(first, 5))
    for a, b in zip(found[::2], shared, strict=True):  # the same set, per row or for all: one answer
        assert a.text == b.text and a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_calibration_divides_out_what_a_content_free_input_gets(engine):
    # Calibrated against itself, a content-free input has no evidence for any label: every label of
    # a set whose first tokens all differ gets the same probability.
    [blank] = _conversations(LABELS, ["N/A"])
    [even] = engine.score([blank], _request(LABELS, len(LABELS)), neutral=[blank])
    assert [math.exp(lp) for _, lp in even.alternatives] == pytest.approx([0.1] * 10, abs=1e-6)
    [raw] = engine.score([blank], _request(LABELS, len(LABELS)))
    assert max(math.exp(lp) for _, lp in raw.alternatives) > 0.2  # the bias it removes

    # a real row, calibrated by the three content-free inputs: still a distribution over the set
    conversations = _conversations(LABELS, _titles(4))
    neutral = _conversations(LABELS, ["N/A", "", "[MASK]"])
    for answer in engine.score(conversations, _request(LABELS, len(LABELS)), neutral=neutral):
        assert math.fsum(math.exp(lp) for _, lp in answer.alternatives) == pytest.approx(1.0, abs=1e-6)
