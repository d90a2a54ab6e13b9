"""Realistic-looking keyword data for the benchmarks: Polish shop keywords, a share of them
repeated with other casing and spacing, as in a real search export."""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
import yaml

REPO = Path(__file__).resolve().parents[1]
_WORDS = (
    "buty",
    "kawa",
    "herbata",
    "witamina",
    "krem",
    "szampon",
    "kurtka",
    "sukienka",
    "plecak",
    "zegarek",
    "nike",
    "adidas",
    "damskie",
    "męskie",
    "dziecięce",
    "tanio",
    "opinie",
    "ranking",
    "promocja",
    "allegro",
    "sklep",
    "czarne",
    "białe",
    "zielona",
    "2026",
    "rozmiar",
    "wodoodporna",
    "skórzane",
    "bawełniana",
    "zestaw",
    "prezent",
    "dostawa",
)


def keywords(rows: int, repeated: float, seed: int = 0, start: int = 0) -> list[str]:
    """``rows`` keywords, ``repeated`` of them repeats (re-cased, re-spaced) of earlier ones."""
    rng = random.Random(seed)
    distinct = [
        " ".join(rng.sample(_WORDS, rng.randint(2, 5))) + f" {start + i}"
        for i in range(int(rows * (1 - repeated)))
    ]
    out = list(distinct)
    for _ in range(rows - len(distinct)):
        text = rng.choice(distinct)
        out.append(rng.choice([text.upper(), text.title(), text.replace(" ", "  "), text]))
    rng.shuffle(out)
    return out


def write_input(path: Path, texts: list[str]) -> Path:
    pl.DataFrame({"id": range(len(texts)), "keyword": texts}).write_parquet(path, row_group_size=100_000)
    return path


def write_job(path: Path, input_path: Path, output: Path, **extra) -> Path:
    job = {
        "input": str(input_path),
        "output": str(output),
        "id_column": "id",
        "text_column": "keyword",
        "labels": ["informacyjna", "nawigacyjna", "komercyjna", "transakcyjna"],
        "prompt": str(REPO / "prompts" / "classify_keyword.pl.yaml"),
        "prompt_vars": {"shop": "internetowego"},
        "model": "fake",
        "backend": "fake",
        "chunk_rows": 100_000,
        **extra,
    }
    path.write_text(yaml.safe_dump(job, allow_unicode=True))
    return path


if __name__ == "__main__":  # python bench/_keywords.py OUT.parquet ROWS REPEATED
    import sys

    write_input(Path(sys.argv[1]), keywords(int(sys.argv[2]), float(sys.argv[3])))
