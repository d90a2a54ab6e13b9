"""Items/s through labelmill and through a bare vLLM loop, on Llama-3.1-8B's shape with dummy weights.

    python bench/gpu_dummy_llama.py --items 20000 --out gpu-figures.json            # one H100/H200
    python bench/gpu_dummy_llama.py --reduced --items 24 --out cpu-figures.json     # CPU smoke test

The model folder has the real Llama-3.1-8B config (32 layers, hidden 4096, FFN 14336, 8 KV heads,
vocabulary 128256) and vLLM's ``load_format="dummy"`` random weights, so no download is needed;
the tokenizer is SmolLM2's (from the ``smollm2-135m`` checkpoint: ``labelmill models fetch
smollm2-135m``), whose ids all lie below 128256. Every item shares a ~1,000-token prefix
(instructions and a 10-label list) and adds ~25 tokens of its own, like a keyword job. labelmill
runs the job twice, with ``decoding: constrained`` and ``decoding: score`` (each label scored in
one decode step, see README "How confidence is computed"); the bare loop sends the same
conversations with the same label-constrained greedy sampling as the first. Reported: the ratio of
labelmill's constrained items/s to the bare loop's (the pipeline's overhead), and of score to
constrained (what scoring saves), with each run's decode steps per item. ``--reduced`` swaps in a
2-layer toy of the same architecture for CPUs, so the script runs in the test suite and cannot rot;
its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu", "vocab_size": 128256,
    "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
REDUCED = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 64, "torch_dtype": "float32"}  # fmt: skip
LABELS = [f"category {c}" for c in "ABCDEFGHIJ"]
WORDS = (
    "shoe", "coffee", "tea", "vitamin", "mask", "brush", "cereal", "sunscreen", "detergent",
    "conditioner", "red", "blue", "pack", "size",
)  # fmt: skip


def model_dir(target: Path, reduced: bool) -> Path:
    from pipeline.models import checkpoint_dir

    tokenizer_from = checkpoint_dir("smollm2-135m")
    if not (tokenizer_from / "tokenizer.json").exists():
        sys.exit("needs the SmolLM2 tokenizer: labelmill models fetch smollm2-135m")
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps({**LLAMA_8B, **(REDUCED if reduced else {})}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, target / name)
    return target


def workload(items: int, seed: int = 0) -> tuple[str, list[str]]:
    rng = random.Random(seed)
    prefix = "Classify the item. " + " ".join(rng.choice(WORDS) for _ in range(900))
    texts = [" ".join(rng.choice(WORDS) for _ in range(22)) + f" {i}" for i in range(items)]
    return prefix, texts


def engine_settings(reduced: bool) -> dict:
    common = {"max_model_len": 2048, "load_format": "dummy"}
    if reduced:
        return {**common, "dtype": "float32", "gpu_memory_utilization": 0.3, "enforce_eager": True}
    return {**common, "dtype": "bfloat16", "gpu_memory_utilization": 0.90, "max_num_seqs": 1024,
            "max_num_batched_tokens": 32768}  # fmt: skip


def through_labelmill(
    work: Path, model: Path, prefix: str, texts: list[str], reduced: bool, decoding: str = "constrained"
) -> dict:
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), work / "items.parquet")
    (work / "prompt.yaml").write_text(yaml.safe_dump({
        "task": "classify", "system": prefix + "\nLabels:\n{labels}\nAnswer with the label only.",
        "user": "Item: {text}",
    }))  # fmt: skip
    job = {
        "input": str(work / "items.parquet"), "output": str(work / f"run-{decoding}"), "id_column": "id",
        "text_column": "text", "labels": LABELS, "prompt": str(work / "prompt.yaml"), "model": str(model),
        "backend": "vllm", "engine": engine_settings(reduced), "chunk_rows": max(len(texts), 1),
        "cache": {"enabled": False}, "dedupe": {"enabled": False}, "decoding": decoding,
    }  # fmt: skip
    job_file = work / f"job-{decoding}.yaml"
    job_file.write_text(yaml.safe_dump(job))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job_file), "--quiet"],
                   cwd=REPO, check=True)  # fmt: skip
    summary = json.loads((work / f"run-{decoding}" / "summary.json").read_text())
    return {
        "decoding": decoding,
        "output_tokens_per_item": round(summary["output_tokens"] / max(summary["rows_done"], 1), 3),
        "items": summary["rows_done"],
        "labelling_seconds": summary["labelling_seconds"],
        "items_per_s": round(summary["rows_done"] / summary["labelling_seconds"], 2),
        "wall_seconds_with_startup": round(time.perf_counter() - t0, 1),
        "ok": summary["status_counts"]["ok"],
    }


def bare_vllm(model: Path, prefix: str, texts: list[str], reduced: bool) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    settings = engine_settings(reduced)
    llm = LLM(model=str(model), seed=0, logprobs_mode="processed_logprobs", **settings)
    system = (
        prefix + "\nLabels:\n" + "\n".join(f"- {label}" for label in LABELS) + "\nAnswer with the label only."
    )
    conversations = [
        [{"role": "system", "content": system}, {"role": "user", "content": f"Item: {t}"}] for t in texts
    ]
    params = SamplingParams(temperature=0, max_tokens=max(len(x.encode()) for x in LABELS) + 1, logprobs=0,
                            structured_outputs=StructuredOutputsParams(choice=LABELS))  # fmt: skip
    # No warm-up: labelmill's figure also starts at the engine's first request (grammar compile,
    # first pass over the shared prefix), so both include the same one-time costs.
    t0 = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    ok = sum(o.outputs[0].text in LABELS for o in outputs)
    llm.llm_engine.engine_core.shutdown()  # else the engine's processes can hold the exit
    return {
        "items": len(outputs),
        "seconds": round(seconds, 3),
        "items_per_s": round(len(outputs) / seconds, 2),
        "ok": ok,
    }


def measured(figures: dict, key: str, out: Path, step) -> dict | None:
    """Run one measurement; a failure is recorded with its reason instead of losing the others, and
    the figures so far are written after each step (a GPU lease can end mid-run)."""
    try:
        figures[key] = step()
    except Exception as exc:  # the reason is the figure here
        figures[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    out.write_text(json.dumps(figures, indent=2))
    print(json.dumps({key: figures[key]}), flush=True)
    return None if "error" in figures[key] else figures[key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--reduced", action="store_true", help="2-layer toy model for CPUs (smoke test)")
    ap.add_argument("--out", type=Path, default=Path("gpu-figures.json"))
    args = ap.parse_args()
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    figures: dict = {
        "model": "Llama-3.1-8B shape, dummy weights" if not args.reduced else "2-layer toy (reduced)",
        "items": args.items,
    }
    with tempfile.TemporaryDirectory(prefix="labelmill-gpu-bench-") as tmp:
        tmp = Path(tmp)
        model = model_dir(tmp / "model", args.reduced)
        prefix, texts = workload(args.items)

        def labelmill(decoding: str):
            return lambda: through_labelmill(tmp, model, prefix, texts, args.reduced, decoding=decoding)

        pipeline = measured(figures, "labelmill", args.out, labelmill("constrained"))
        scored = measured(figures, "labelmill_score", args.out, labelmill("score"))
        bare = measured(figures, "bare_vllm", args.out, lambda: bare_vllm(model, prefix, texts, args.reduced))
    if pipeline and bare:
        figures["ratio_labelmill_to_bare"] = round(pipeline["items_per_s"] / bare["items_per_s"], 3)
    if pipeline and scored:
        figures["ratio_score_to_constrained"] = round(scored["items_per_s"] / pipeline["items_per_s"], 3)
    args.out.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    if not (pipeline and scored and bare):
        sys.exit(1)


if __name__ == "__main__":
    main()
