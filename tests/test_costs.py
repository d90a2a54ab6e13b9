"""Cost accounting: dollars computed by hand, projections, strict price files, the shipped table.

The arithmetic tests use prices written here, not the shipped ``prices.yaml``, so that editing a
price never breaks them; the shipped file is only checked for shape and completeness.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from pipeline.costs import (
    UNVERIFIED_NOTE,
    ApiPrice,
    CpuPrice,
    GpuPrice,
    PriceTable,
    Sample,
    api_cost,
    load_prices,
    project,
    self_hosted_cost,
)
from pipeline.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = REPO_ROOT / "prices.yaml"

CACHED_API = {
    "id": "test/cached",
    "provider": "Test",
    "model": "cached-model",
    "input_per_mtok": 0.15,
    "cached_input_per_mtok": 0.075,
    "output_per_mtok": 0.60,
    "batch_discount": 0.5,
    "as_of": "2026-01-02",
    "source": "https://example.com/pricing",
}
PLAIN_API = {
    "id": "test/plain",
    "provider": "Test",
    "model": "plain-model",
    "input_per_mtok": 0.20,
    "cached_input_per_mtok": None,
    "output_per_mtok": 0.60,
    "batch_discount": 0,
    "as_of": "2026-01-02",
    "source": "https://example.com/pricing",
    "note": f"{UNVERIFIED_NOTE}",
}
GPU = {
    "id": "test-gpu",
    "name": "Test GPU 80GB",
    "usd_per_hour": 4.00,
    "as_of": "2026-01-03",
    "source": "https://example.com/gpu-pricing",
    "note": "on-demand list price, 1 GPU",
}
CPU = {
    "id": "test-cpu",
    "name": "Test CPU machine, 16 vCPU",
    "usd_per_hour": 0.72,
    "as_of": "2026-01-04",
    "source": "https://example.com/cpu-pricing",
    "note": "on-demand list price, 1 instance",
}


@pytest.fixture
def cached() -> ApiPrice:
    return ApiPrice.model_validate(CACHED_API)


@pytest.fixture
def plain() -> ApiPrice:
    return ApiPrice.model_validate(PLAIN_API)


@pytest.fixture
def gpu() -> GpuPrice:
    return GpuPrice.model_validate(GPU)


@pytest.fixture
def cpu() -> CpuPrice:
    return CpuPrice.model_validate(CPU)


# --- api_cost ---------------------------------------------------------------------------------------


def test_api_cost_bills_cached_tokens_at_the_cached_rate(cached: ApiPrice) -> None:
    # 1,000,000 input of which 400,000 cached, 200,000 output:
    #   600,000 x $0.15/M = $0.09;  400,000 x $0.075/M = $0.03;  200,000 x $0.60/M = $0.12  -> $0.24
    assert api_cost(cached, 1_000_000, 400_000, 200_000) == pytest.approx(0.24)


def test_api_cost_without_a_cache_rate_bills_cached_tokens_as_input(plain: ApiPrice) -> None:
    # no caching discount: all 1,000,000 input at $0.20/M = $0.20;  200,000 x $0.60/M = $0.12  -> $0.32
    assert api_cost(plain, 1_000_000, 400_000, 200_000) == pytest.approx(0.32)
    assert api_cost(plain, 1_000_000, 400_000, 200_000) == api_cost(plain, 1_000_000, 0, 200_000)


def test_api_cost_uncached(cached: ApiPrice) -> None:
    # 2,500 input x $0.15/M = $0.000375;  10 output x $0.60/M = $0.000006  -> $0.000381
    assert api_cost(cached, 2_500, 0, 10) == pytest.approx(0.000381)


def test_batch_discount_applies_to_every_token(cached: ApiPrice, plain: ApiPrice) -> None:
    assert api_cost(cached, 1_000_000, 400_000, 200_000, batch=True) == pytest.approx(0.12)  # half of $0.24
    assert api_cost(plain, 1_000_000, 400_000, 200_000, batch=True) == pytest.approx(0.32)  # no discount


def test_api_cost_refuses_impossible_counts(cached: ApiPrice) -> None:
    with pytest.raises(ValueError, match="exceeds input_tokens"):
        api_cost(cached, 100, 101, 0)
    with pytest.raises(ValueError, match="output_tokens must be >= 0"):
        api_cost(cached, 100, 0, -1)


# --- self_hosted_cost -------------------------------------------------------------------------------


def test_self_hosted_cost_is_wall_time_times_hourly_price(gpu: GpuPrice) -> None:
    assert self_hosted_cost(gpu, 5_400) == pytest.approx(6.00)  # 1.5 h x $4.00
    assert self_hosted_cost(gpu, 5_400, gpus=2) == pytest.approx(12.00)  # two GPUs for 1.5 h
    assert self_hosted_cost(gpu, 90) == pytest.approx(0.10)  # 1/40 h x $4.00
    assert self_hosted_cost(gpu, 0) == 0


def test_self_hosted_cost_refuses_bad_arguments(gpu: GpuPrice, cpu: CpuPrice) -> None:
    with pytest.raises(ValueError, match="wall_seconds"):
        self_hosted_cost(gpu, -1)
    with pytest.raises(ValueError, match="gpus"):
        self_hosted_cost(gpu, 10, gpus=0)
    with pytest.raises(ValueError, match="one machine"):
        self_hosted_cost(cpu, 10, gpus=2)


def test_cpu_machine_cost_is_wall_time_times_its_hourly_price(cpu: CpuPrice) -> None:
    assert self_hosted_cost(cpu, 5_400) == pytest.approx(1.08)  # 1.5 h x $0.72


# --- project ----------------------------------------------------------------------------------------

# 10,000 rows: 150 input tokens per row (100 of them a cached shared prefix), 3 output tokens per
# row, 600 s of wall time.
SAMPLE = Sample(
    rows=10_000, input_tokens=1_500_000, cached_tokens=1_000_000, output_tokens=30_000, wall_seconds=600
)


def test_projection_self_hosted_to_100m_rows(gpu: GpuPrice) -> None:
    p = project(SAMPLE, gpu, 100_000_000)
    # sample: 600 s = 1/6 h x $4.00 = $0.6667 for 10,000 rows -> $66.67 per 1M rows
    assert p.kind == "self-hosted"
    assert p.backend == "test-gpu"
    assert p.usd_per_million_items == pytest.approx(66.6667, rel=1e-5)
    assert p.target_usd == pytest.approx(6_666.67, rel=1e-5)  # 100 x $66.67
    # 0.06 s per row x 100,000,000 rows = 6,000,000 s = 1,666.67 h
    assert p.target_hours == pytest.approx(1_666.667, rel=1e-5)
    assert p.input_tokens_per_item == 150
    assert p.cached_tokens_per_item == 100
    assert p.output_tokens_per_item == 3
    assert p.tokens_per_item == 153
    assert p.price_as_of == dt.date(2026, 1, 3)
    assert p.price_verified is True
    assert p.hardware == "gpu"
    assert p.model_share == 1  # no model_calls given: every row was a call


def test_projection_of_a_cpu_run_uses_the_cpu_machine_price(cpu: CpuPrice, gpu: GpuPrice) -> None:
    p = project(SAMPLE, cpu, 100_000_000)
    # 600 s = 1/6 h x $0.72 = $0.12 for 10,000 rows -> $12.00 per 1M rows (the GPU's: $66.67)
    assert (p.kind, p.hardware) == ("self-hosted", "cpu")
    assert p.usd_per_million_items == pytest.approx(12.00)
    assert p.target_usd == pytest.approx(1_200.00)
    assert p.target_hours == pytest.approx(1_666.667, rel=1e-5)  # the same measured time
    assert p.usd_per_million_items != pytest.approx(project(SAMPLE, gpu).usd_per_million_items)


def test_projection_self_hosted_counts_every_gpu(gpu: GpuPrice) -> None:
    one, two = project(SAMPLE, gpu, 100_000_000), project(SAMPLE, gpu, 100_000_000, gpus=2)
    assert two.target_usd == pytest.approx(2 * one.target_usd)
    assert two.target_hours == one.target_hours  # the wall time was measured with those GPUs


def test_projection_api_to_100m_rows(cached: ApiPrice) -> None:
    p = project(SAMPLE, cached, 100_000_000)
    # per row: 50 uncached x $0.15/M = $0.0000075; 100 cached x $0.075/M = $0.0000075;
    #          3 output x $0.60/M = $0.0000018  -> $0.0000168 per row = $16.80 per 1M rows
    assert p.kind == "api"
    assert p.usd_per_million_items == pytest.approx(16.80)
    assert p.target_usd == pytest.approx(1_680.00)
    assert p.target_hours == pytest.approx(1_666.667, rel=1e-5)
    batched = project(SAMPLE, cached, 100_000_000, batch=True)
    assert batched.target_usd == pytest.approx(840.00)


def test_projection_is_linear_in_rows(cached: ApiPrice) -> None:
    small, large = project(SAMPLE, cached, 1_000_000), project(SAMPLE, cached, 100_000_000)
    assert large.target_usd == pytest.approx(100 * small.target_usd)
    assert large.usd_per_million_items == pytest.approx(small.usd_per_million_items)


def test_projection_carries_the_price_date_and_verification(plain: ApiPrice) -> None:
    p = project(SAMPLE, plain)
    assert p.target_rows == 100_000_000  # the default target
    assert p.price_as_of == dt.date(2026, 1, 2)
    assert p.price_verified is False


# The same calls as SAMPLE's, one in four rows: 10,000 rows, of which 1,000 have no text and 6,500
# repeat a text already asked, so 2,500 model calls of 150 input tokens (100 cached), 3 output
# tokens and 0.06 s each.
DEDUPED = Sample(
    rows=10_000,
    input_tokens=375_000,
    cached_tokens=250_000,
    output_tokens=7_500,
    wall_seconds=150,
    model_calls=2_500,
    rows_needing_answer=9_000,
)


def test_projection_prices_only_the_measured_share_of_rows(cached: ApiPrice, gpu: GpuPrice) -> None:
    p = project(DEDUPED, cached, 100_000_000)
    # per call $0.0000168 (as in test_projection_api_to_100m_rows) x 0.25 calls per row
    #   = $0.0000042 per row = $4.20 per 1M rows; 100M rows = $420
    assert p.model_share == 0.25
    assert p.usd_per_million_items == pytest.approx(4.20)
    assert p.target_usd == pytest.approx(420.00)
    assert (p.input_tokens_per_item, p.cached_tokens_per_item, p.output_tokens_per_item) == (37.5, 25, 0.75)
    # 0.06 s per call x 25,000,000 calls = 1,500,000 s = 416.67 h
    assert p.target_hours == pytest.approx(416.667, rel=1e-5)
    # GPU: 0.06 s x $4.00/h = $0.00006667 per call x 0.25 = $16.67 per 1M rows
    assert project(DEDUPED, gpu).usd_per_million_items == pytest.approx(16.6667, rel=1e-5)


def test_projection_without_dedupe_savings_asks_every_row_that_needs_an_answer(cached: ApiPrice) -> None:
    p = project(DEDUPED, cached, 100_000_000, dedupe_savings=False)
    # 9,000 of 10,000 rows need an answer: $0.0000168 x 0.9 = $0.00001512 per row = $15.12 per 1M
    assert p.model_share == 0.9
    assert p.usd_per_million_items == pytest.approx(15.12)
    assert p.target_usd == pytest.approx(1_512.00)
    assert p.target_hours == pytest.approx(1_500.0)  # 0.06 s x 90,000,000 calls
    assert p.output_tokens_per_item == pytest.approx(2.7)
    batched = project(DEDUPED, cached, 100_000_000, batch=True, dedupe_savings=False)
    assert batched.target_usd == pytest.approx(756.00)


def test_reasoning_output_tokens_are_priced_as_output(cached: ApiPrice) -> None:
    # 500 output tokens per row instead of 3: 497 more x $0.60/M = $0.0002982 more per row
    reasoning = Sample(
        rows=10_000,
        input_tokens=1_500_000,
        cached_tokens=1_000_000,
        output_tokens=5_000_000,
        wall_seconds=600,
    )
    more = project(reasoning, cached).usd_per_million_items - project(SAMPLE, cached).usd_per_million_items
    assert more == pytest.approx(298.20)


def test_a_sample_without_model_calls_has_no_cost_per_call(cached: ApiPrice) -> None:
    all_cached = Sample(10, 0, 0, 0, 0.5, model_calls=0, rows_needing_answer=10)
    assert project(all_cached, cached).target_usd == 0  # every row was answered without the model
    with pytest.raises(ValueError, match="no model call"):
        project(all_cached, cached, dedupe_savings=False)


def test_sample_refuses_impossible_totals() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        Sample(rows=0, input_tokens=0, cached_tokens=0, output_tokens=0, wall_seconds=0)
    with pytest.raises(ValueError, match="exceeds input_tokens"):
        Sample(rows=1, input_tokens=10, cached_tokens=11, output_tokens=0, wall_seconds=1)
    with pytest.raises(ValueError, match="wall_seconds"):
        Sample(rows=1, input_tokens=10, cached_tokens=0, output_tokens=0, wall_seconds=-1)
    with pytest.raises(ValueError, match="model_calls"):
        Sample(rows=10, input_tokens=10, cached_tokens=0, output_tokens=0, wall_seconds=1, model_calls=11)
    with pytest.raises(ValueError, match="rows_needing_answer"):
        Sample(10, 10, 0, 0, 1, model_calls=5, rows_needing_answer=4)
    with pytest.raises(ValueError, match="rows_needing_answer"):
        Sample(10, 10, 0, 0, 1, rows_needing_answer=11)


# --- load_prices: bad files are refused, naming the file and the entry -------------------------------


def write_prices(tmp_path: Path, data: dict | None = None, text: str | None = None) -> Path:
    path = tmp_path / "prices.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def price_error(tmp_path: Path, data: dict | None = None, text: str | None = None) -> str:
    path = write_prices(tmp_path, data, text)
    with pytest.raises(ConfigError) as info:
        load_prices(path)
    message = str(info.value)
    assert str(path) in message, "the error must name the price file"
    return message


def test_valid_file_loads(tmp_path: Path) -> None:
    reasoner = {**CACHED_API, "id": "test/reasoner", "reasoning": True}
    data = {"api": [CACHED_API, PLAIN_API, reasoner], "gpu": [GPU], "cpu": [CPU]}
    table = load_prices(write_prices(tmp_path, data))
    assert isinstance(table, PriceTable)
    assert [p.id for p in table.api] == ["test/cached", "test/plain", "test/reasoner"]
    assert table.get("test-gpu") == GpuPrice.model_validate(GPU)
    assert isinstance(table.get("test-cpu"), CpuPrice) and not isinstance(table.get("test-cpu"), GpuPrice)
    assert table.api[0].as_of == dt.date(2026, 1, 2)
    assert table.api[0].verified and not table.api[1].verified
    assert [p.reasoning for p in table.api] == [False, False, True]


def test_cpu_entries_are_checked_like_gpu_entries(tmp_path: Path) -> None:
    message = price_error(tmp_path, {"cpu": [{**CPU, "usd_per_hour": 0}]})
    assert "cpu[0] (id 'test-cpu')" in message and "usd_per_hour" in message
    message = price_error(tmp_path, {"gpu": [GPU], "cpu": [{**CPU, "id": "test-gpu"}]})
    assert "duplicate id 'test-gpu'" in message


def test_unknown_key_is_named_with_the_entry_id(tmp_path: Path) -> None:
    entry = {**CACHED_API, "input_per_mtoken": 0.15}
    message = price_error(tmp_path, {"api": [PLAIN_API, entry]})
    assert "api[1] (id 'test/cached')" in message
    assert "unknown key 'input_per_mtoken'" in message


def test_negative_price_is_refused_with_the_entry_id(tmp_path: Path) -> None:
    message = price_error(tmp_path, {"api": [{**PLAIN_API, "output_per_mtok": -0.6}]})
    assert "id 'test/plain'" in message
    assert "output_per_mtok" in message


def test_negative_gpu_price_is_refused_with_the_entry_id(tmp_path: Path) -> None:
    message = price_error(tmp_path, {"gpu": [{**GPU, "usd_per_hour": -1}]})
    assert "gpu[0] (id 'test-gpu')" in message
    assert "usd_per_hour" in message


def test_duplicate_id_is_refused_naming_it(tmp_path: Path) -> None:
    message = price_error(tmp_path, {"api": [CACHED_API, {**PLAIN_API, "id": "test/cached"}]})
    assert "duplicate id 'test/cached'" in message
    assert "api[0] and api[1]" in message


def test_duplicate_id_across_api_and_gpu_is_refused(tmp_path: Path) -> None:
    message = price_error(tmp_path, {"api": [CACHED_API], "gpu": [{**GPU, "id": "test/cached"}]})
    assert "duplicate id 'test/cached'" in message


def test_missing_field_is_named_with_the_entry_id(tmp_path: Path) -> None:
    entry = {k: v for k, v in GPU.items() if k != "as_of"}
    message = price_error(tmp_path, {"gpu": [entry]})
    assert "gpu[0] (id 'test-gpu')" in message
    assert "missing required key 'as_of'" in message


def test_null_cached_price_must_be_written_out(tmp_path: Path) -> None:
    entry = {k: v for k, v in PLAIN_API.items() if k != "cached_input_per_mtok"}
    message = price_error(tmp_path, {"api": [entry]})
    assert "missing required key 'cached_input_per_mtok'" in message


def test_entry_without_id_is_named_by_position(tmp_path: Path) -> None:
    entry = {k: v for k, v in CACHED_API.items() if k != "id"}
    message = price_error(tmp_path, {"api": [PLAIN_API, entry]})
    assert "api[1]: missing required key 'id'" in message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_discount", 1.0),
        ("batch_discount", -0.1),
        ("source", "example.com/pricing"),
        ("as_of", "last week"),
    ],
)
def test_out_of_range_values_are_refused(tmp_path: Path, field: str, value: object) -> None:
    message = price_error(tmp_path, {"api": [{**CACHED_API, field: value}]})
    assert "id 'test/cached'" in message
    assert field in message


def test_unknown_top_level_key_is_refused(tmp_path: Path) -> None:
    message = price_error(tmp_path, {"api": [], "gpus": []})
    assert "unknown key 'gpus'" in message


def test_not_yaml_missing_and_not_a_mapping(tmp_path: Path) -> None:
    assert "not valid YAML" in price_error(tmp_path, text="api: [unclosed\n")
    assert "must hold a mapping" in price_error(tmp_path, text="- just\n- a list\n")
    assert "must hold a mapping" in price_error(tmp_path, text="")
    with pytest.raises(ConfigError, match="not found"):
        load_prices(tmp_path / "nope.yaml")


def test_unknown_id_lookup_lists_known_ids(tmp_path: Path) -> None:
    table = load_prices(write_prices(tmp_path, {"api": [CACHED_API], "gpu": [GPU]}))
    with pytest.raises(ConfigError, match="no price with id 'b200'; known: test/cached, test-gpu"):
        table.get("b200")
    with_cpu = load_prices(write_prices(tmp_path, {"gpu": [GPU], "cpu": [CPU]}))
    with pytest.raises(ConfigError, match="known: test-gpu, test-cpu"):
        with_cpu.get("b200")


def test_price_file_errors_exit_like_config_errors(tmp_path: Path) -> None:
    path = write_prices(tmp_path, {"api": [{**PLAIN_API, "input_per_mtok": -1}]})
    with pytest.raises(ConfigError) as info:
        load_prices(path)
    assert info.value.exit_code == 2


# --- the shipped prices.yaml ------------------------------------------------------------------------

REQUIRED_API = {
    "openai/gpt-4o-mini",
    "openai/gpt-4.1-nano",
    "openai/gpt-5-nano",
    "anthropic/claude-haiku-4.5",
    "google/gemini-2.5-flash-lite",
    "openrouter/llama-3.1-8b-instruct",
    "groq/llama-3.1-8b-instant",
    "deepinfra/llama-3.1-8b-instruct",
    "together/llama-3.1-8b-instruct-turbo",
}
REQUIRED_GPU = {"h100-80gb", "h200-141gb", "l40s-48gb", "a100-80gb"}
REQUIRED_CPU = {"aws-c7i-4xlarge"}


@pytest.fixture(scope="module")
def shipped() -> PriceTable:
    return load_prices(SHIPPED)


def test_shipped_table_has_every_required_entry(shipped: PriceTable) -> None:
    missing = (
        (REQUIRED_API - {p.id for p in shipped.api})
        | (REQUIRED_GPU - {g.id for g in shipped.gpu})
        | (REQUIRED_CPU - {c.id for c in shipped.cpu})
    )
    assert not missing, f"prices.yaml lacks {sorted(missing)}"
    # a reasoning model's estimate from another model's tokens must be flagged as too low
    assert shipped.get("openai/gpt-5-nano").reasoning
    assert not shipped.get("openai/gpt-4o-mini").reasoning


def test_shipped_table_llama_hosts_and_named_versions(shipped: PriceTable) -> None:
    llama_hosts = {p.provider for p in shipped.api if "llama-3.1-8b" in p.model.lower()}
    assert {"OpenRouter", "Groq", "DeepInfra", "Together AI"} <= llama_hosts
    assert "haiku-4-5" in shipped.get("anthropic/claude-haiku-4.5").model
    assert "2.5-flash-lite" in shipped.get("google/gemini-2.5-flash-lite").model


def test_shipped_table_entries_are_dated_sourced_and_marked(shipped: PriceTable) -> None:
    for entry in (*shipped.api, *shipped.gpu, *shipped.cpu):
        assert entry.source.startswith("https://"), entry.id
        assert dt.date(2024, 1, 1) <= entry.as_of <= dt.date.today(), entry.id
        if entry.note is not None and "unverified" in entry.note:
            assert entry.note.startswith(UNVERIFIED_NOTE), f"{entry.id}: unverified marker must lead the note"
    for g in (*shipped.gpu, *shipped.cpu):
        assert "on-demand" in g.note.lower(), f"{g.id}: the note must say which kind of offer it is"


def test_shipped_table_header_warns_that_prices_change() -> None:
    header = SHIPPED.read_text(encoding="utf-8").split("\napi:", 1)[0]
    assert "PRICES CHANGE" in header
    assert "before you decide" in header
