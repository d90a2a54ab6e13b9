"""labelmill as an installed package: built-in prompt templates by name, shipped defaults, the wheel.

The wheel test builds the wheel from a copy of the checkout, installs it into a fresh virtual
environment and runs ``labelmill`` from a folder outside the checkout. The new environment borrows
the test interpreter's site-packages (a ``.pth`` line) for the dependencies instead of downloading
them; a plain path line runs none of that folder's own ``.pth`` files, so the checkout's editable
install stays out and the ``pipeline`` imported is the wheel's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import resources
from pipeline.bench import load_profiles
from pipeline.costs import load_prices
from pipeline.errors import PromptError
from pipeline.prompts import load_template, locate

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = "classify_product.en"
# What the build reads; everything else in the checkout stays out of the copy.
BUILD_INPUTS = (
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "pipeline",
    "prompts",
    "prices.yaml",
    "backends.yaml",
)
LABELS = ["Coffee", "Tea", "Vitamin", "Shoes"]


def test_builtin_prompt_names_are_the_files_of_prompts() -> None:
    assert resources.prompt_names() == sorted(
        p.name.removesuffix(".yaml") for p in (REPO_ROOT / "prompts").glob("*.yaml")
    )
    assert BUILT_IN in resources.prompt_names()


def test_a_builtin_template_is_named_without_a_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert locate(BUILT_IN).read_bytes() == (REPO_ROOT / "prompts" / f"{BUILT_IN}.yaml").read_bytes()
    assert load_template(BUILT_IN).task == "classify"


def test_an_existing_path_wins_over_a_builtin_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path(BUILT_IN).write_text("task: classify\nsystem: local copy\nuser: '{text}'\n", encoding="utf-8")
    assert locate(BUILT_IN) == Path(BUILT_IN)
    assert load_template(BUILT_IN).system == "local copy"


def test_paths_keep_working(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    assert locate(f"prompts/{BUILT_IN}.yaml") == Path(f"prompts/{BUILT_IN}.yaml")
    monkeypatch.chdir(tmp_path)
    # A path that does not exist is not looked up among the built-ins, even when its file name
    # is one: the job meant that file.
    with pytest.raises(PromptError, match="not found") as info:
        locate(f"prompts/{BUILT_IN}.yaml")
    assert BUILT_IN in str(info.value)


def test_an_unknown_name_lists_the_builtin_names(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PromptError, match="no built-in template has that name") as info:
        locate("classify_produkt.en")
    assert all(name in info.value.hint for name in resources.prompt_names())


@pytest.mark.parametrize("name", ["../prices", "../pyproject", "", ".", f"prompts/{BUILT_IN}"])
def test_a_builtin_name_never_leaves_the_prompts_folder(name: str) -> None:
    assert resources.builtin_prompt(name) is None


def test_bench_defaults_are_the_shipped_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no prices.yaml or backends.yaml here
    assert load_prices().api
    assert "fake" in load_profiles()


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def _build_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    # Top-level .py files too: setuptools would ship them as modules of the data package.
    for name in (*BUILD_INPUTS, *(p.name for p in REPO_ROOT.glob("*.py"))):
        item = REPO_ROOT / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=skip)
        else:
            shutil.copy2(item, src / name)
    dist = tmp_path / "dist"
    # No build isolation and no index: the build uses this environment's setuptools, offline.
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(dist), str(src)],
        cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = dist.glob("labelmill-*.whl")
    return wheel


def _check_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
    shipped = {n.removeprefix("pipeline/_builtin/") for n in names if n.startswith("pipeline/_builtin/")}
    prompts = {f"prompts/{p.name}" for p in (REPO_ROOT / "prompts").glob("*.yaml")}
    assert shipped == {"prices.yaml", "backends.yaml", *prompts}
    # Every module of the checkout ships (pyproject lists the packages by hand), and nothing else does.
    modules = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "pipeline").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"pipeline"}


def _install(wheel: Path, venv: Path) -> tuple[Path, dict[str, str]]:
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv.parent)
    python = venv / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
         str(wheel)],
        cwd=venv.parent,
    )  # fmt: skip
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv)
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib.stdout.strip()) / "_labelmill_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["LABELMILL_HOME"] = str(venv.parent / "home")
    return venv, env


def test_the_wheel_runs_a_job_outside_the_checkout(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    _check_wheel_contents(wheel)
    venv, env = _install(wheel, tmp_path / "venv")
    work = tmp_path / "work"
    work.mkdir()

    where = _run(
        [str(venv / "bin" / "python"), "-c",
         "import pipeline; from pipeline import resources; print(pipeline.__file__); "
         "print(resources.data_root())"],
        work, env,
    ).stdout.split()  # fmt: skip
    assert all(Path(p).is_relative_to(venv) for p in where), where

    rows = 30
    titles = [f"{LABELS[i % 4].lower()} product number {i}" for i in range(rows)]
    pq.write_table(
        pa.table({"id": pa.array(range(rows), pa.int64()), "title": titles}), work / "input.parquet"
    )
    job = {
        "input": "input.parquet",
        "output": "out/run",
        "id_column": "id",
        "text_column": "title",
        "labels": LABELS,
        "prompt": BUILT_IN,
        "model": "fake",
        "backend": "fake",
        "chunk_rows": 10,
    }
    (work / "job.yaml").write_text(yaml.safe_dump(job), encoding="utf-8")
    labelmill = str(venv / "bin" / "labelmill")

    validated = _run([labelmill, "validate", "job.yaml"], work, env)
    assert "Product title: coffee product number 0" in validated.stdout
    _run([labelmill, "run", "job.yaml"], work, env)
    parts = sorted((work / "out" / "run" / "parts").glob("*.parquet"))
    out = pa.concat_tables(pq.read_table(p) for p in parts).to_pydict()
    assert out["id"] == list(range(rows))
    assert set(out["status"]) == {"ok"}
    assert set(out["label"]) <= set(LABELS)
    manifest = json.loads((work / "out" / "run" / "run.json").read_text())
    assert manifest["provenance"]["prompt_file"] == BUILT_IN

    # The bench's profiles and prices come with the package: none are in the work folder.
    _run([labelmill, "bench", "job.yaml", "--backends", "fake", "--sample", "10", "--no-charts"], work, env)
    report = json.loads((work / "out" / "bench-run" / "bench.json").read_text())
    assert report["backends"]["fake"]["rows"] == 10
