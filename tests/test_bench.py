"""``labelmill bench`` end to end: the fake backend and an HTTP backend on a loopback server."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from conftest import REPO_ROOT
from fault_server import FaultServer

from pipeline.bench import load_profiles, sample_input
from pipeline.cli import main
from pipeline.config import load_job
from pipeline.errors import ConfigError

KEY = "sk-bench-test-93f2"
PRICES = {
    "api": [
        {
            "id": "test/api-model",
            "provider": "test",
            "model": "api-model",
            "input_per_mtok": 1.0,
            "cached_input_per_mtok": 0.5,
            "output_per_mtok": 4.0,
            "batch_discount": 0.5,
            "as_of": "2026-11-01",
            "source": "https://example.com/pricing",
        }
    ],
    "gpu": [
        {
            "id": "test-gpu",
            "name": "Test GPU",
            "usd_per_hour": 3.6,
            "as_of": "2026-11-01",
            "source": "https://example.com/gpu",
            "note": "on-demand",
        }
    ],
}


@pytest.fixture
def setup(make_job, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_KEY", KEY)
    with FaultServer(KEY) as server:
        titles = [f"Green tea {i}" for i in range(60)]
        gold = ["Tea" if i % 2 else "Coffee" for i in range(60)]
        data = pa.table({"id": pa.array(range(60), pa.int64()), "title": titles, "gold": gold})
        job = make_job(data, row_group_size=7, chunk_rows=8)
        profiles = {
            "fake": {"job": {"backend": "fake", "model": "fake"}, "price": {"gpu": "test-gpu"}},
            "api": {
                "job": {
                    "backend": "openai",
                    "model": "m",
                    "api": {"base_url": server.base_url, "api_key_env": "BENCH_KEY"},
                },
                "price": {"api": "test/api-model"},
            },
        }
        (tmp_path / "profiles.yaml").write_text(yaml.safe_dump(profiles))
        (tmp_path / "prices.yaml").write_text(yaml.safe_dump(PRICES))
        yield job, tmp_path


def test_bench_writes_the_three_reports_with_hand_checked_costs(setup):
    job, tmp = setup
    out = tmp / "bench"
    args = ["bench", str(job.path), "--backends", "fake,api", "--sample", "40", "--project", "1000000",
            "--gold-column", "gold", "--price-apis", "test/api-model", "--out", str(out),
            "--profiles", str(tmp / "profiles.yaml"), "--prices", str(tmp / "prices.yaml")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    md = (out / "bench.md").read_text()
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert report["sample_rows"] == 40
    api = report["backends"]["api"]
    assert (api["rows"], api["input_tokens"], api["cached_tokens"], api["output_tokens"]) == (
        40,
        4000,
        2560,
        80,
    )
    by_name = {p["name"]: p for p in report["projections"]}
    # Per item: 36 uncached x $1 + 64 cached x $0.5 + 2 out x $4 per 1M tokens = $76 per 1M items.
    assert by_name["api"]["usd_per_million_items"] == pytest.approx(76.0)
    assert by_name["api"]["target_usd"] == pytest.approx(76.0)
    estimate = by_name["test/api-model batch API (tokens of api)"]
    assert estimate["estimate"] and estimate["usd_per_million_items"] == pytest.approx(38.0)
    fake = report["backends"]["fake"]
    gpu_hours_per_item = fake["labelling_seconds"] / 40 / 3600
    self_hosted = by_name["fake (time x test-gpu $/h)"]
    assert self_hosted["usd_per_million_items"] == pytest.approx(gpu_hours_per_item * 3.6 * 1e6, rel=1e-6)
    assert self_hosted["kind"] == "self-hosted"
    assert estimate["target_hours"] is None  # not called: its speed is unknown
    assert by_name["api"]["target_hours"] > 0

    assert report["agreement"]["fake"]["fake"] == 1.0
    assert 0.0 <= report["agreement"]["fake"]["api"] <= 1.0
    assert report["accuracy"]["api"]["rows"] == 40
    assert "| api | m |" in md
    assert "$ per 1M items" in md and "76.00" in md and "Self-hosted cost = measured" in md


def test_sample_is_spread_over_the_input_and_deterministic(setup, tmp_path):
    job, _ = setup
    a = tmp_path / "a.parquet"
    b = tmp_path / "b.parquet"
    sample_input(load_job(job.path), 10, 7, a, ["gold"])
    sample_input(load_job(job.path), 10, 7, b, ["gold"])
    ids = pq.read_table(a).column("id").to_pylist()
    assert ids == pq.read_table(b).column("id").to_pylist()
    assert ids == sorted(ids) and len(set(ids)) == 10 and max(ids) > 30  # not just the first rows


def test_unknown_profile_or_price_fails_before_any_run(setup):
    job, tmp = setup
    profiles = load_profiles(tmp / "profiles.yaml")
    from pipeline.bench import bench
    from pipeline.costs import load_prices

    prices = load_prices(tmp / "prices.yaml")
    with pytest.raises(ConfigError, match="nope"):
        bench(load_job(job.path), ["nope"], profiles, prices, tmp / "o")
    with pytest.raises(ConfigError, match="missing/price"):
        bench(load_job(job.path), ["fake"], profiles, prices, tmp / "o", price_apis=["missing/price"])
    assert not (tmp / "o" / "runs").exists()


def test_shipped_profiles_load_and_name_real_prices():
    from pipeline.costs import load_prices

    prices = load_prices(REPO_ROOT / "prices.yaml")
    for name, profile in load_profiles(REPO_ROOT / "backends.yaml").items():
        if profile.price:
            for price_id in (profile.price.gpu, profile.price.api):
                if price_id:
                    prices.get(price_id)  # raises if the id is not in the table
        assert profile.job["backend"] in {"vllm", "openai", "fake"}, name


def test_bench_refuses_extraction_jobs(setup, make_job):
    from pipeline.bench import bench
    from pipeline.costs import load_prices

    _, tmp = setup
    job = make_job(
        task="extract",
        labels=None,
        attributes=[{"name": "brand", "type": "string"}],
        prompt=str(REPO_ROOT / "prompts" / "extract_product.en.yaml"),
    )
    with pytest.raises(ConfigError, match="one label per row"):
        bench(
            load_job(job.path),
            ["fake"],
            load_profiles(tmp / "profiles.yaml"),
            load_prices(tmp / "prices.yaml"),
            tmp,
        )
