"""The lexical retriever alone: rows/s over a 10,000-label taxonomy, and recall@K on WANDS.

    python bench/retrieval.py                                  # the figures
    python bench/retrieval.py --rows 500 --repeats 1           # smoke test

Speed: ``--rows`` OA-Mine titles (repeated to that count) against the English Shopify taxonomy
(10,281 category paths), the 20 best labels per row; one untimed warm-up pass, then ``--repeats``
timed passes; rows/s of each and their median, and the time to build the index. Recall: the 300
WANDS queries of ``sample_data/wands_queries.parquet`` against the 188 WANDS classes: how often
the gold class is among the first K (K = 1, 5, 10, 20). Retrieval by category names alone; the
shortlist of the taxonomy issue adds retrieval by labelled examples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import polars as pl

    from pipeline.labels import load_labels
    from pipeline.retrieval import LexicalRetriever

    data = REPO / "sample_data"
    labels = load_labels(None, str(data / "shopify-taxonomy" / "categories.en.txt"))
    t0 = time.perf_counter()
    retriever = LexicalRetriever(labels)
    build = time.perf_counter() - t0
    titles = pl.read_parquet(data / "oa_mine_products.parquet")["title"].to_list()
    texts = (titles * (args.rows // len(titles) + 1))[: args.rows]
    retriever.top(texts[:4096], args.k)  # warm-up: first allocations and page faults
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        retriever.top(texts, args.k)
        rates.append(len(texts) / (time.perf_counter() - t0))

    classes = load_labels(None, str(data / "wands" / "classes.txt"))
    queries = pl.read_parquet(data / "wands_queries.parquet")
    top = LexicalRetriever(classes).top(queries["query"].to_list(), 20)
    gold = queries["query_class"].to_list()
    recall = {
        k: round(
            sum(g in {classes[j] for j in row[:k]} for g, row in zip(gold, top, strict=True)) / len(gold), 3
        )
        for k in (1, 5, 10, 20)
    }
    report = {
        "labels": len(labels),
        "rows": len(texts),
        "k": args.k,
        "index_build_seconds": round(build, 2),
        "rows_per_second": [round(r) for r in rates],
        "median_rows_per_second": round(statistics.median(rates)),
        "wands_recall_at_k": recall,
        "wands_queries": len(gold),
        "wands_classes": len(classes),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
