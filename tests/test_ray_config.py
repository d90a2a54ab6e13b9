"""``executor:`` and ``ray:`` in a job, without a cluster: the keys, and Ray missing."""

from __future__ import annotations

import sys

import pytest

from pipeline.config import RayConfig
from pipeline.errors import MissingDependencyError
from pipeline.plan import plan_job
from pipeline.runner import run_job


def test_executor_keys_round_trip_and_leave_the_fingerprint_alone(make_job):
    local = make_job(name="local").load()
    remote = local.with_changes(executor="ray", ray={"address": "auto", "engines": 4, "gpus_per_engine": 1})
    assert remote.ray == RayConfig(address="auto", engines=4, gpus_per_engine=1)
    assert "executor" not in local.to_dict() and remote.to_dict()["ray"]["engines"] == 4
    # where chunks run is not what they are: a run may be resumed on the other executor
    assert plan_job(local).manifest.fingerprint == plan_job(remote).manifest.fingerprint


def test_a_typo_in_the_ray_section_is_refused(make_job):
    with pytest.raises(Exception, match="engine"):
        make_job(executor="ray", ray={"engine": 2}).load()


def test_executor_ray_without_ray_installed_says_what_to_install(make_job, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as where it is not installed
    monkeypatch.delitem(sys.modules, "pipeline.executors.ray", raising=False)
    with pytest.raises(MissingDependencyError, match="labelmill\\[ray\\]"):
        run_job(make_job(executor="ray").load())
