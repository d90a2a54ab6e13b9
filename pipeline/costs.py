"""Cost accounting for benchmarks: the price table, dollars for measured usage, and projections.

``prices.yaml`` (shipped with labelmill) lists API prices per million tokens and GPU prices per hour. It is
data the user edits, so it is loaded as strictly as a job file: an unknown key, a negative price, a
repeated id or a missing field is refused with the file and the entry's id named, never guessed.

The arithmetic is deliberately plain, and its assumptions are the ones a reader must accept before
trusting a projection:

- Cost scales linearly with rows. A sample of N rows that cost C costs C * M / N for M rows: no
  volume discounts, no rate-limit stalls, no change in the mix of row lengths.
- API cost is list price times measured tokens. Cache writes, cache storage, long-context surcharges,
  retries and taxes are not counted.
- Self-hosted cost is measured wall time times the GPU's price per hour (times the number of GPUs),
  or times a CPU instance's price per hour for a run measured on a CPU, as the user states it in
  ``prices.yaml``. Idle time, start-up, storage and egress count only as far as they are inside the
  measured wall time.
- Only rows that reach the model cost anything. A sample measures how many of its rows did (the
  rest repeated a text already asked, came from the cache, or had no text), and a projection prices
  that share of its rows, unless it is asked to price every row with text.
- Output tokens are what the backend reported. For a reasoning model they include the hidden
  reasoning tokens (billed as output), so they must be measured, never assumed to be a label's worth.

``prices.yaml`` also lists CPU machines' prices per hour, for runs measured on a CPU.

Prices go stale. Every price carries its ``as_of`` date and whether it was read on the provider's
own page (:attr:`ApiPrice.verified`), and a :class:`Projection` passes both on so that a report
can show them next to the dollars.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline import resources
from pipeline.errors import ConfigError, yaml_position

UNVERIFIED_NOTE = "unverified; check source"
"""A ``note`` starting with this marks a price not read on the provider's own page."""

_URL_PATTERN = r"^https?://\S+$"
_TOKENS_PER_MTOK = 1_000_000
_SECONDS_PER_HOUR = 3600


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiPrice(_Strict):
    """One hosted model's token prices, USD per 1,000,000 tokens."""

    id: str = Field(min_length=1)
    """Unique name, conventionally ``<provider>/<model>``."""
    provider: str = Field(min_length=1)
    model: str = Field(min_length=1)
    """The model name as the provider's API spells it."""
    input_per_mtok: float = Field(ge=0)
    """Input tokens that are not prompt-cache hits."""
    cached_input_per_mtok: float | None = Field(ge=0)
    """Input tokens read from the provider's prompt cache. Required, but may be null: null means the
    provider gives no caching discount, and cached tokens are billed at ``input_per_mtok``."""
    output_per_mtok: float = Field(ge=0)
    batch_discount: float = Field(ge=0, lt=1)
    """Fraction taken off every token by the provider's batch API (0.5 = half price); 0 = none."""
    as_of: dt.date
    """When the price was read."""
    source: str = Field(pattern=_URL_PATTERN)
    """The provider's pricing page, where the figure should be checked."""
    note: str | None = None
    """Free text; starts with :data:`UNVERIFIED_NOTE` when the figure was not read at ``source``."""
    reasoning: bool = False
    """A reasoning model: it bills hidden reasoning tokens as output, so its cost can only be
    estimated from a backend that reasoned the same way (another model's output tokens miss them)."""

    @property
    def verified(self) -> bool:
        return not (self.note or "").startswith(UNVERIFIED_NOTE)


class _HourlyPrice(_Strict):
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    usd_per_hour: float = Field(gt=0)
    as_of: dt.date
    source: str = Field(pattern=_URL_PATTERN)
    note: str = Field(min_length=1)
    """Which kind of offer (on-demand, spot, reserved; which provider). Starts with
    :data:`UNVERIFIED_NOTE` when the figure was not read at ``source``."""

    @property
    def verified(self) -> bool:
        return not self.note.startswith(UNVERIFIED_NOTE)


class GpuPrice(_HourlyPrice):
    """One GPU's rental price, USD per GPU per hour."""


class CpuPrice(_HourlyPrice):
    """One CPU machine's rental price, USD per instance per hour (all its cores: a CPU engine uses
    the whole machine). The price for a run measured on a CPU, whose speed says nothing about a
    GPU's."""


class PriceTable(_Strict):
    """The whole ``prices.yaml``. Ids are unique across all lists, so one id names one backend."""

    api: list[ApiPrice] = Field(default_factory=list)
    gpu: list[GpuPrice] = Field(default_factory=list)
    cpu: list[CpuPrice] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> PriceTable:
        seen: dict[str, str] = {}
        for where, entries in (("api", self.api), ("gpu", self.gpu), ("cpu", self.cpu)):
            for i, entry in enumerate(entries):
                here = f"{where}[{i}]"
                if entry.id in seen:
                    raise ValueError(
                        f"duplicate id '{entry.id}' ({seen[entry.id]} and {here}); ids must be unique"
                    )
                seen[entry.id] = here
        return self

    def get(self, price_id: str) -> ApiPrice | GpuPrice | CpuPrice:
        """The entry with this id; a ConfigError listing the known ids if there is none."""
        for entry in (*self.api, *self.gpu, *self.cpu):
            if entry.id == price_id:
                return entry
        known = ", ".join(e.id for e in (*self.api, *self.gpu, *self.cpu)) or "(none)"
        raise ConfigError(f"no price with id '{price_id}'; known: {known}")


def load_prices(path: str | Path | None = None) -> PriceTable:
    """Read and validate a price table: ``path`` (relative to the current directory), or the one
    shipped with labelmill."""
    path = Path(path) if path is not None else resources.price_table()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"price file {path} not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"price file {path} is not UTF-8 text ({exc.reason})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {yaml_position(exc) or 'a syntax error'}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping with 'api:', 'gpu:' and 'cpu:' lists")
    try:
        return PriceTable.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, path, raw)) from None


def _explain(exc: ValidationError, path: Path, raw: dict[str, Any]) -> str:
    """One line per problem, naming the entry by its id (or its position when it has none)."""
    lines = [f"{path}: {exc.error_count()} problem(s) in the price table"]
    for err in exc.errors():
        loc = list(err["loc"])
        where = _entry_name(raw, loc)
        field = ".".join(str(p) for p in loc[2:]) if where else ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {where or '(top level)'}: unknown key '{field}'")
        elif err["type"] == "missing":
            lines.append(f"  - {where or '(top level)'}: missing required key '{field}'")
        else:
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"  - {where + ': ' if where else ''}{field + ': ' if field else ''}{message}")
    return "\n".join(lines)


def _entry_name(raw: dict[str, Any], loc: list[Any]) -> str:
    """``api[2] (id 'openai/gpt-4o-mini')`` for a location inside a list entry, else ``''``."""
    if len(loc) < 2 or loc[0] not in ("api", "gpu", "cpu") or not isinstance(loc[1], int):
        return ""
    name = f"{loc[0]}[{loc[1]}]"
    entries = raw.get(loc[0])
    if isinstance(entries, list) and loc[1] < len(entries) and isinstance(entries[loc[1]], dict):
        entry_id = entries[loc[1]].get("id")
        if entry_id is not None:
            name += f" (id '{entry_id}')"
    return name


def api_cost(
    price: ApiPrice, input_tokens: int, cached_tokens: int, output_tokens: int, batch: bool = False
) -> float:
    """USD for this usage at ``price``.

    ``input_tokens`` counts every prompt token, the cached ones included; ``cached_tokens`` is the
    part of them read from the provider's prompt cache. That is how OpenAI, Gemini and vLLM report
    usage (Anthropic reports cache reads apart: add them to ``input_tokens`` first). Cached tokens
    cost ``cached_input_per_mtok`` when the price has one, else the full input price. ``batch``
    applies the batch discount to everything, cached tokens included.
    """
    _check_counts(input_tokens=input_tokens, cached_tokens=cached_tokens, output_tokens=output_tokens)
    if cached_tokens > input_tokens:
        raise ValueError(f"cached_tokens ({cached_tokens}) exceeds input_tokens ({input_tokens})")
    cached_rate = price.input_per_mtok if price.cached_input_per_mtok is None else price.cached_input_per_mtok
    usd = (
        (input_tokens - cached_tokens) * price.input_per_mtok
        + cached_tokens * cached_rate
        + output_tokens * price.output_per_mtok
    ) / _TOKENS_PER_MTOK
    return usd * (1 - price.batch_discount) if batch else usd


def self_hosted_cost(gpu: GpuPrice | CpuPrice, wall_seconds: float, gpus: int = 1) -> float:
    """USD for renting ``gpus`` GPUs for ``wall_seconds``: wall time x price per GPU-hour x GPUs
    (for a :class:`CpuPrice`, one machine: ``gpus`` must be 1).

    The wall time is the user's measurement; whatever it leaves out (model load, idle machines,
    storage) is not in the cost.
    """
    if wall_seconds < 0:
        raise ValueError(f"wall_seconds must be >= 0, got {wall_seconds}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if isinstance(gpu, CpuPrice) and gpus != 1:
        raise ValueError(f"a CPU price is for one machine; got gpus={gpus}")
    return wall_seconds / _SECONDS_PER_HOUR * gpu.usd_per_hour * gpus


@dataclass(frozen=True)
class Sample:
    """Measured totals of one benchmark run on one backend.

    Token counts follow :func:`api_cost` (``cached_tokens`` is part of ``input_tokens``) and, like
    ``wall_seconds`` (the run's wall-clock time at the parallelism it ran with), are what the model
    calls took: rows answered by a duplicate or the cache cost none of them.
    """

    rows: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    wall_seconds: float
    model_calls: int | None = None
    """Texts the model answered (one per distinct text asked). None: one per row."""
    rows_needing_answer: int | None = None
    """Rows that needed an answer: model calls + cache hits + rows that repeated a text (rows
    without text need none). None: every row. Without duplicate collapsing or a cache, each of
    these rows would be a model call."""

    def __post_init__(self) -> None:
        if self.rows < 1:
            raise ValueError(f"a sample needs at least one row, got {self.rows}")
        # frozen: the defaults are filled in once, so readers never handle None
        if self.rows_needing_answer is None:
            object.__setattr__(self, "rows_needing_answer", self.rows)
        if self.model_calls is None:
            object.__setattr__(self, "model_calls", self.rows_needing_answer)
        if not 0 <= self.model_calls <= self.rows_needing_answer <= self.rows:
            raise ValueError(
                f"need 0 <= model_calls ({self.model_calls}) <= rows_needing_answer "
                f"({self.rows_needing_answer}) <= rows ({self.rows})"
            )
        _check_counts(
            input_tokens=self.input_tokens,
            cached_tokens=self.cached_tokens,
            output_tokens=self.output_tokens,
            wall_seconds=self.wall_seconds,
        )
        if self.cached_tokens > self.input_tokens:
            raise ValueError(
                f"cached_tokens ({self.cached_tokens}) exceeds input_tokens ({self.input_tokens})"
            )


@dataclass(frozen=True)
class Projection:
    """What a sample says ``target_rows`` would cost on one backend, scaled linearly."""

    backend: str
    """The price id."""
    kind: Literal["api", "self-hosted"]
    sample_rows: int
    target_rows: int
    input_tokens_per_item: float
    cached_tokens_per_item: float
    output_tokens_per_item: float
    usd_per_million_items: float
    target_usd: float
    target_hours: float
    """Wall-clock hours at the sample's parallelism (its GPUs, or its API request concurrency).
    A provider's batch API sets its own turnaround (up to a day) and is not predicted here."""
    price_as_of: dt.date
    price_verified: bool

    hardware: Literal["gpu", "cpu"] | None
    """What the self-hosted price rents (None for an API)."""
    model_share: float
    """Model calls per projected row: the sample's measured share of rows that reached the model
    (duplicates and cache hits cost nothing), or of rows needing an answer when the projection is
    asked for the price without those savings. Per-item tokens and dollars include it."""

    @property
    def tokens_per_item(self) -> float:
        """Input plus output tokens per row (cached tokens are part of the input)."""
        return self.input_tokens_per_item + self.output_tokens_per_item


def project(
    sample: Sample,
    price: ApiPrice | GpuPrice | CpuPrice,
    target_rows: int = 100_000_000,
    *,
    batch: bool = False,
    gpus: int = 1,
    dedupe_savings: bool = True,
) -> Projection:
    """Scale a measured sample to ``target_rows`` on one backend.

    For an :class:`ApiPrice` the dollars come from the sample's tokens (``batch`` applies the batch
    discount); for a :class:`GpuPrice` from its wall time on ``gpus`` GPUs, for a :class:`CpuPrice`
    from its wall time on one machine. Either way the cost and wall time of one model call are
    multiplied by the calls ``target_rows`` would make: the sample's share of rows that reached the
    model, or with ``dedupe_savings=False`` its share of rows that needed an answer (every such
    row asked). Cost is assumed linear in rows.
    """
    if target_rows < 1:
        raise ValueError(f"target_rows must be >= 1, got {target_rows}")
    hardware: Literal["gpu", "cpu"] | None
    if isinstance(price, ApiPrice):
        kind: Literal["api", "self-hosted"] = "api"
        hardware = None
        sample_usd = api_cost(price, sample.input_tokens, sample.cached_tokens, sample.output_tokens, batch)
    else:
        kind = "self-hosted"
        hardware = "cpu" if isinstance(price, CpuPrice) else "gpu"
        sample_usd = self_hosted_cost(price, sample.wall_seconds, gpus)
    calls = sample.model_calls
    asked = calls if dedupe_savings else sample.rows_needing_answer
    if asked and not calls:
        raise ValueError("the sample made no model call, so the cost of one is unknown")
    share = asked / sample.rows

    def per_item(total: float) -> float:  # a call's share of the sample total, times calls per row
        return total / calls * share if calls else 0.0

    usd_per_row = per_item(sample_usd)
    return Projection(
        backend=price.id,
        kind=kind,
        sample_rows=sample.rows,
        target_rows=target_rows,
        input_tokens_per_item=per_item(sample.input_tokens),
        cached_tokens_per_item=per_item(sample.cached_tokens),
        output_tokens_per_item=per_item(sample.output_tokens),
        usd_per_million_items=usd_per_row * 1_000_000,
        target_usd=usd_per_row * target_rows,
        target_hours=per_item(sample.wall_seconds) * target_rows / _SECONDS_PER_HOUR,
        price_as_of=price.as_of,
        price_verified=price.verified,
        hardware=hardware,
        model_share=share,
    )


def _check_counts(**counts: float) -> None:
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
