"""``labelmill bench`` end to end: the fake backend and an HTTP backend on a loopback server, and
backend plugins (defined here) that reason, load weights on this machine, or print warnings."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from conftest import REPO_ROOT
from fault_server import FaultServer

from pipeline.backends.base import Backend
from pipeline.backends.fake import FakeBackend
from pipeline.bench import Profile, bench, chart_rows, load_profiles, ran_on, sample_input
from pipeline.cli import main
from pipeline.config import load_job
from pipeline.costs import load_prices
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
        },
        {
            "id": "test/reasoner",
            "provider": "test",
            "model": "reasoner",
            "input_per_mtok": 1.0,
            "cached_input_per_mtok": None,
            "output_per_mtok": 4.0,
            "batch_discount": 0,
            "as_of": "2026-11-01",
            "source": "https://example.com/pricing",
            "reasoning": True,
        },
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
    "cpu": [
        {
            "id": "test-cpu",
            "name": "Test CPU machine",
            "usd_per_hour": 0.72,
            "as_of": "2026-11-01",
            "source": "https://example.com/cpu",
            "note": "on-demand",
        }
    ],
}
NO_GPU = {"host": "test-host", "cpu": "x86_64", "cores": 2, "gpu": None}
WITH_GPU = {**NO_GPU, "gpu": "NVIDIA H100 80GB HBM3"}


class RowFake(FakeBackend):
    """The fake answering row by row through ``complete``, as the HTTP and vLLM backends do, with
    ``extra_output`` more output tokens per answer than the fake counts."""

    name = "row-fake"
    section = None
    extra_output = 0

    @classmethod
    def cannot_score(cls, settings):
        return "an API answers row by row"  # as an HTTP API without token-level control

    def answer(self, prompt, texts, request):
        return Backend.answer(self, prompt, texts, request)

    def complete(self, conversations, request):
        answers = super().complete(conversations, request)
        return [dataclasses.replace(a, output_tokens=a.output_tokens + self.extra_output) for a in answers]


class ThinkingFake(RowFake):
    """A reasoning model's usage: 500 hidden reasoning tokens per answer, reported as output."""

    name = "thinking-fake"
    extra_output = 500


class LocalEngine(FakeBackend):
    """The fake as an engine that loads its weights on this machine, as vLLM does: it runs on this
    machine's CPU or GPU."""

    name = "local-engine"
    section = None
    loads_weights = True


class NoisyEngine(FakeBackend):
    """Writes warnings to stdout the three ways an engine does: ``print``, a logging handler that
    holds the process's own stdout (as vLLM's does), and a worker process that inherited
    descriptor 1 (as vLLM's engine core does)."""

    name = "noisy-engine"
    section = None

    def start(self):
        print("NOISY-PRINT: engine warming up")
        engine_log = logging.getLogger("noisy_engine")
        engine_log.addHandler(logging.StreamHandler(sys.__stdout__))
        engine_log.propagate = False
        engine_log.warning("NOISY-LOG: falling back to a slow kernel")
        subprocess.run([sys.executable, "-c", "print('NOISY-WORKER: worker ready')"], check=True)


DOUBLES = {d.name: f"test_bench:{d.__name__}" for d in (RowFake, ThinkingFake, LocalEngine, NoisyEngine)}


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
    prices = load_prices(tmp / "prices.yaml")
    with pytest.raises(ConfigError, match="nope"):
        bench(load_job(job.path), ["nope"], profiles, prices, tmp / "o")
    with pytest.raises(ConfigError, match="missing/price"):
        bench(load_job(job.path), ["fake"], profiles, prices, tmp / "o", price_apis=["missing/price"])
    assert not (tmp / "o" / "runs").exists()


def test_shipped_profiles_load_and_name_real_prices():
    prices = load_prices(REPO_ROOT / "prices.yaml")
    profiles = load_profiles(REPO_ROOT / "backends.yaml")
    for name, profile in profiles.items():
        for price_id in profile.price_ids:
            prices.get(price_id)  # raises if the id is not in the table
        assert profile.job["backend"] in {"vllm", "openai", "fake"}, name
    # vLLM's CPU build is priced at a CPU machine, never at a GPU's hourly rate
    assert profiles["local-vllm-cpu"].price.gpu is None
    assert prices.get(profiles["local-vllm-cpu"].price.cpu) in prices.cpu


def test_bench_refuses_extraction_jobs(setup, make_job):
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


def _bench(tmp, job, backends, profiles, **kwargs):
    (tmp / "more-profiles.yaml").write_text(yaml.safe_dump(profiles))
    out = tmp / f"bench-{len(list(tmp.glob('bench-*')))}"
    report = bench(
        load_job(job.path),
        backends,
        load_profiles(tmp / "more-profiles.yaml"),
        load_prices(tmp / "prices.yaml"),
        out,
        charts=False,
        **kwargs,
    )
    return report, (out / "bench.md").read_text(), {p["name"]: p for p in report["projections"]}


def test_a_cpu_run_is_never_priced_at_a_gpu_rate(setup, register_plugins):
    job, tmp = setup
    register_plugins(backends=DOUBLES)
    weights = tmp / "weights"  # a local engine's model: is a folder of weights on this machine
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    engine = {"backend": "local-engine", "model": str(weights)}
    profiles = {
        "gpu-priced": {"job": engine, "price": {"gpu": "test-gpu"}},
        "both-priced": {"job": engine, "price": {"gpu": "test-gpu", "cpu": "test-cpu"}},
    }
    report, md, rows = _bench(
        tmp, job, ["gpu-priced", "both-priced"], profiles, sample_rows=40, machine=NO_GPU
    )

    for name in ("gpu-priced", "both-priced"):
        assert report["backends"][name]["hardware"] == "cpu"
        assert report["backends"][name]["hardware_detected_by"] == "no CUDA GPU on this machine"
    assert not [p for p in report["projections"] if p["price_id"] == "test-gpu"]
    # no CPU price in its profile: tokens and hours, no dollars, and no bar in the chart
    measured = rows["gpu-priced (CPU measurement)"]
    assert (measured["priced"], measured["usd_per_million_items"], measured["target_usd"]) == (
        False,
        None,
        None,
    )
    assert measured["hardware"] == "cpu" and measured["target_hours"] > 0
    drawn, left_out = chart_rows(report)
    assert left_out == ["gpu-priced (CPU measurement)"]
    assert all(p["priced"] for p in drawn)
    assert "| gpu-priced (CPU measurement) | CPU measurement, not priced | 100.0% | - | - |" in md
    assert f"| gpu-priced | {weights} | CPU |" in md
    assert "never priced at a GPU's hourly rate" in md
    # with a CPU price: the measured time at that machine's rate, $0.72 an hour
    cpu = rows["both-priced (time x test-cpu $/h)"]
    seconds_per_item = report["backends"]["both-priced"]["labelling_seconds"] / 40
    assert cpu["usd_per_million_items"] == pytest.approx(seconds_per_item / 3600 * 0.72 * 1e6, rel=1e-6)
    assert cpu["hardware"] == "cpu" and cpu["priced"]
    assert "| both-priced (time x test-cpu $/h) | self-hosted CPU |" in md

    # the same engine on a machine with a GPU: the GPU price applies, the CPU price does not
    report, md, rows = _bench(tmp, job, ["both-priced"], profiles, sample_rows=40, machine=WITH_GPU)
    assert report["backends"]["both-priced"]["hardware"] == "gpu"
    assert list(rows) == ["both-priced (time x test-gpu $/h)"]
    assert "| both-priced (time x test-gpu $/h) | self-hosted GPU |" in md


def test_the_projection_prices_only_the_rows_that_reach_the_model(setup, make_job):
    _, tmp = setup
    # 40 rows, 10 distinct titles, in chunks of 8: each title is asked once (later rows repeat it
    # within a chunk, or find it in the run's own store across chunks)
    data = pa.table(
        {"id": pa.array(range(40), pa.int64()), "title": [f"Green tea {i % 10}" for i in range(40)]}
    )
    job = make_job(data, chunk_rows=8)
    base = ["bench", str(job.path), "--backends", "api", "--sample", "40", "--project", "1000000",
            "--profiles", str(tmp / "profiles.yaml"), "--prices", str(tmp / "prices.yaml"),
            "--no-charts"]  # fmt: skip
    result = CliRunner().invoke(main, [*base, "--out", str(tmp / "saved")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp / "saved" / "bench.json").read_text())
    api = report["backends"]["api"]
    assert (api["rows"], api["model_calls"], api["rows_needing_answer"]) == (40, 10, 40)
    assert (api["input_tokens"], api["cached_tokens"], api["output_tokens"]) == (1000, 640, 20)
    (row,) = report["projections"]
    # per call: 36 uncached x $1 + 64 cached x $0.5 + 2 out x $4 per 1M tokens = $76 per 1M calls;
    # 10 calls for 40 rows: 0.25 calls per row -> $19 per 1M rows
    assert row["model_share"] == 0.25
    assert row["usd_per_million_items"] == pytest.approx(19.0)
    assert row["target_usd"] == pytest.approx(19.0)
    assert row["target_hours"] == pytest.approx(api["labelling_seconds"] / 10 * 0.25 * 1e6 / 3600, rel=1e-6)
    md = (tmp / "saved" / "bench.md").read_text()
    assert "| api | m | - | " in md and "| 25.0% (10/40) | 100.0 | 64.0 | 2.0 |" in md
    assert "| api | api | 25.0% | 19.00 | 19 |" in md

    raw = CliRunner().invoke(main, [*base, "--out", str(tmp / "raw"), "--no-dedupe-savings"])
    assert raw.exit_code == 0, raw.output
    (row,) = json.loads((tmp / "raw" / "bench.json").read_text())["projections"]
    assert row["model_share"] == 1.0
    assert row["usd_per_million_items"] == pytest.approx(76.0)  # every row asked
    assert "--no-dedupe-savings" in (tmp / "raw" / "bench.md").read_text()


def test_reasoning_tokens_are_measured_and_priced(setup, register_plugins):
    job, tmp = setup
    register_plugins(backends=DOUBLES)
    profiles = {
        "plain": {"job": {"backend": "row-fake", "model": "fake"}, "price": {"api": "test/api-model"}},
        "thinker": {
            "job": {"backend": "thinking-fake", "model": "fake"},
            "price": {"api": "test/api-model"},
            "reasoning": True,
        },
    }
    report, md, rows = _bench(
        tmp, job, ["plain", "thinker"], profiles, sample_rows=40, price_apis=["test/reasoner"], machine=NO_GPU
    )
    plain, thinker = report["backends"]["plain"], report["backends"]["thinker"]
    assert thinker["input_tokens"] == plain["input_tokens"]
    assert thinker["output_tokens"] - plain["output_tokens"] == 500 * 40  # as the backend reported
    # 500 more output tokens a row x $4 per 1M tokens = $2,000 more per 1M rows
    more = rows["thinker"]["usd_per_million_items"] - rows["plain"]["usd_per_million_items"]
    assert more == pytest.approx(2000.0)
    assert rows["thinker"]["output_tokens_per_item"] == pytest.approx(thinker["output_tokens"] / 40)
    assert (thinker["reasoning"], plain["reasoning"]) == (True, False)
    assert "| thinker | fake (reasoning) |" in md and "| plain | fake |" in md
    assert "thinker is a reasoning model: its output tokens are as the backend reported them" in md
    # a reasoning API estimated from a model that does not reason is marked too low
    assert "test/reasoner is a reasoning model: its estimate uses the output tokens of plain" in md
    assert "| test/reasoner (tokens of plain; no reasoning tokens, too low) *(estimate)* |" in md


def test_engine_output_goes_to_stderr_never_into_the_report(setup, register_plugins):
    job, tmp = setup
    register_plugins(backends=DOUBLES)
    profiles = {"noisy": {"job": {"backend": "noisy-engine", "model": "fake"}, "price": {"gpu": "test-gpu"}}}
    (tmp / "noisy.yaml").write_text(yaml.safe_dump(profiles))
    out = tmp / "noisy-bench"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp / "plugin-site"), str(REPO_ROOT / "tests")])}
    args = [sys.executable, "-m", "pipeline.cli", "bench", str(job.path), "--backends", "noisy",
            "--sample", "10", "--profiles", str(tmp / "noisy.yaml"), "--prices", str(tmp / "prices.yaml"),
            "--out", str(out), "--no-charts"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp, timeout=120)
    assert done.returncode == 0, done.stderr
    markers = ("NOISY-PRINT", "NOISY-LOG", "NOISY-WORKER")
    for marker in markers:
        assert marker in done.stderr, marker
    report = (out / "bench.md").read_text()
    assert report.startswith("# labelmill bench:")
    assert done.stdout.startswith(report)  # stdout: the report, then the line naming the files
    for text in (done.stdout, report):
        assert not [m for m in markers if m in text]


def test_a_server_on_this_machine_runs_on_its_hardware(make_job, monkeypatch):
    monkeypatch.setenv("BENCH_KEY", KEY)
    api = {"api_key_env": "BENCH_KEY"}
    here = load_job(
        make_job(backend="openai", model="m", api={**api, "base_url": "http://127.0.0.1:8000/v1"}).path
    )
    away = load_job(
        make_job(backend="openai", model="m", api={**api, "base_url": "https://api.example.com/v1"}).path
    )
    plain, stated = Profile(job={}), Profile(job={}, hardware="gpu")
    assert ran_on(here, plain, NO_GPU) == ("cpu", "a server on this machine, which has no CUDA GPU")
    assert ran_on(here, plain, WITH_GPU)[0] == "gpu"
    assert ran_on(here, plain, NO_GPU, rents=False) == (None, "")  # priced by tokens: no machine's time
    assert ran_on(away, plain, NO_GPU) == (None, "")  # elsewhere: its price says what it rents
    assert ran_on(here, stated, NO_GPU) == ("gpu", "stated in the profile")
