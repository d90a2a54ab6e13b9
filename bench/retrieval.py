"""The retrievers of a shortlist: rows/s over a 10,000-label taxonomy, and recall@K on WANDS.

    python bench/retrieval.py                                  # the figures
    python bench/retrieval.py --rows 500 --repeats 1           # smoke test
    python bench/retrieval.py --device cuda                    # embeddings on the GPU

Speed: ``--rows`` OA-Mine titles (repeated to that count) against the English Shopify taxonomy
(10,281 category paths), the 20 best labels per row; one untimed warm-up pass, then ``--repeats``
timed passes; rows/s of each and their median, and the time to build the index. The same for the
embedding retriever (``--model``, default the ``all-minilm-l6-v2`` alias: ``labelmill models fetch
all-minilm-l6-v2``) over ``--embedding-rows`` titles, with the encoding of the 10,281 label paths
timed on its own, once (then the load of the same vectors from the on-disk cache). Without the
model, or without sentence-transformers, the embedding figures are skipped, saying why.

Recall: the 300 WANDS queries of ``sample_data/wands_queries.parquet`` against the 188 WANDS
classes: how often the gold class is among the first K (K = 1, 5, 10, 20), for each retriever
alone; for the examples retriever (the 174 other WANDS queries of ``sample_data/wands/examples.parquet``
as labelled examples, 50 neighbours) by n-grams and by embeddings, each with a label scored by its
nearest example (max, the default) and by the sum over its examples; and for the retrievers merged
as a shortlist merges them: each one's K best, interleaved by rank (up to 3K candidates: their mean
number is given), and the first K of that list (the same number of candidates as one retriever).

Merge: ``merge_candidates`` over 50,000 rows x 3 retrievers x 20 candidates, seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KS = (1, 5, 10, 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--embedding-rows", type=int, default=None, help="default: --rows, at most 5,000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--model", default="all-minilm-l6-v2", help="embedding model: alias or folder")
    parser.add_argument("--device", default=None, help="embeddings on cpu / cuda (default: theirs)")
    parser.add_argument("--no-embeddings", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np
    import polars as pl

    from pipeline.labels import load_labels
    from pipeline.retrieval import ExamplesRetriever, LexicalRetriever, load_examples, merge_candidates

    data = REPO / "sample_data"
    labels = load_labels(None, str(data / "shopify-taxonomy" / "categories.en.txt"))
    t0 = time.perf_counter()
    retriever = LexicalRetriever(labels)
    build = time.perf_counter() - t0
    titles = pl.read_parquet(data / "oa_mine_products.parquet")["title"].to_list()
    texts = (titles * (args.rows // len(titles) + 1))[: args.rows]
    rates = _rates(retriever, texts, args.k, args.repeats)

    model, why_not = (None, "--no-embeddings") if args.no_embeddings else _embedding_model(args.model)
    embeddings: dict = {"skipped": why_not}
    if model is not None:
        from pipeline.retrieval import EmbeddingRetriever

        rows = args.embedding_rows or min(args.rows, 5_000)
        with tempfile.TemporaryDirectory(prefix="labelmill-bench-vectors-") as cache:
            t0 = time.perf_counter()
            embedder = EmbeddingRetriever(labels, model, Path(cache), device=args.device)
            encoded = time.perf_counter() - t0
            t0 = time.perf_counter()
            embedder = EmbeddingRetriever(labels, model, Path(cache), device=args.device)
            cached = time.perf_counter() - t0
        embed_rates = _rates(embedder, texts[:rows], args.k, args.repeats)
        embeddings = {
            "model": args.model,
            "device": embedder.device,
            "rows": rows,
            "label_encoding_seconds": round(encoded, 2),
            "label_vectors_from_cache_seconds": round(cached, 2),
            "rows_per_second": [round(r) for r in embed_rates],
            "median_rows_per_second": round(statistics.median(embed_rates)),
        }

    classes = load_labels(None, str(data / "wands" / "classes.txt"))
    queries = pl.read_parquet(data / "wands_queries.parquet")
    wands_texts, gold = queries["query"].to_list(), queries["query_class"].to_list()
    example_texts, example_labels = load_examples(data / "wands" / "examples.parquet", "query", "query_class")
    found = {"lexical": LexicalRetriever(classes).top(wands_texts, max(KS))}
    for aggregate in ("max", "sum"):
        by_ngrams = ExamplesRetriever(classes, example_texts, example_labels, aggregate=aggregate)
        found[f"examples (n-grams, {aggregate})"] = by_ngrams.top(wands_texts, max(KS))
    if model is not None:
        with tempfile.TemporaryDirectory(prefix="labelmill-bench-vectors-") as cache:
            found["embeddings"] = EmbeddingRetriever(classes, model, Path(cache), device=args.device).top(
                wands_texts, max(KS)
            )
            for aggregate in ("max", "sum"):
                by_vectors = ExamplesRetriever(
                    classes, example_texts, example_labels, model=model, cache_dir=Path(cache),
                    device=args.device, aggregate=aggregate,
                )  # fmt: skip
                found[f"examples (embeddings, {aggregate})"] = by_vectors.top(wands_texts, max(KS))
    merges = {"lexical + examples": ["lexical", "examples (n-grams, max)"]}
    if model is not None:
        merges["lexical + embeddings"] = ["lexical", "embeddings"]
        merges["lexical + embeddings + examples"] = ["lexical", "embeddings", "examples (n-grams, max)"]
    table = {name: {"recall": _recall(top.tolist(), gold, classes)} for name, top in found.items()}
    for name, parts in merges.items():
        merged = {k: merge_candidates([found[p][:, :k] for p in parts]) for k in KS}
        table[f"{name}, merged"] = {
            "recall": {k: _hit_rate(merged[k], gold, classes) for k in KS},
            "mean_candidates": {k: round(statistics.mean(map(len, merged[k])), 1) for k in KS},
        }
        first = merge_candidates([found[p] for p in parts])
        table[f"{name}, merged, first K"] = {"recall": _recall(first, gold, classes)}

    rng = np.random.default_rng(0)
    candidates = [rng.integers(0, len(labels), (50_000, 20)) for _ in range(3)]
    t0 = time.perf_counter()
    merge_candidates(candidates)
    merge_seconds = time.perf_counter() - t0

    report = {
        "labels": len(labels),
        "rows": len(texts),
        "k": args.k,
        "index_build_seconds": round(build, 2),
        "rows_per_second": [round(r) for r in rates],
        "median_rows_per_second": round(statistics.median(rates)),
        "wands_recall_at_k": table["lexical"]["recall"],
        "wands_queries": len(gold),
        "wands_classes": len(classes),
        "embeddings": embeddings,
        "wands_examples": len(example_texts),
        "wands_recall_by_retriever": table,
        "merge_seconds_50000_rows_3x20": round(merge_seconds, 3),
    }
    print(_table(table))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def _rates(retriever, texts: list[str], k: int, repeats: int) -> list[float]:
    retriever.top(texts[:4096], k)  # warm-up: first allocations and page faults
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        retriever.top(texts, k)
        rates.append(len(texts) / (time.perf_counter() - t0))
    return rates


def _embedding_model(name: str) -> tuple[str | None, str]:
    """The model folder, or None and why the embedding figures are skipped."""
    import importlib.util

    from pipeline.errors import LabelmillError
    from pipeline.models import resolve_model

    if importlib.util.find_spec("sentence_transformers") is None:
        return None, "sentence-transformers is not installed (pip install 'labelmill[taxonomy]')"
    try:
        resolved = resolve_model(name)
    except LabelmillError as exc:
        return None, str(exc)
    if not Path(resolved).is_dir():
        return None, f"{name} resolves to {resolved}, not a local folder"
    return resolved, ""


def _recall(found: list[list[int]], gold: list[str], classes: list[str]) -> dict[int, float]:
    return {k: _hit_rate([row[:k] for row in found], gold, classes) for k in KS}


def _hit_rate(found: list[list[int]], gold: list[str], classes: list[str]) -> float:
    hits = sum(g in {classes[j] for j in row if j >= 0} for g, row in zip(gold, found, strict=True))
    return round(hits / len(gold), 3)


def _table(table: dict) -> str:
    width = max(map(len, table)) + 2
    lines = ["WANDS recall@K" + " " * (width - 14) + "".join(f"{f'@{k}':>8}" for k in KS) + "  candidates@K"]
    for name, row in table.items():
        sizes = row.get("mean_candidates")
        shown = " / ".join(f"{sizes[k]:g}" for k in KS) if sizes else "K"
        lines.append(f"{name:{width}}" + "".join(f"{row['recall'][k]:8.3f}" for k in KS) + f"  {shown}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
