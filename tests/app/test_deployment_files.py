"""The deployment files parse and wire the services the way the README says (docker cannot run here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_declares_the_stack() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "api", "worker", "flower"} <= set(services)
    assert services["api"]["build"]["target"] == "api" and services["worker"]["build"]["target"] == "worker"
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    # a pool per queue: every queue a job can be routed to has a worker consuming it
    assert "gpu" in (ROOT / "Dockerfile").read_text().rsplit("CMD", 1)[1]
    cpu_pool = services["worker-cpu"]["command"]
    assert cpu_pool[cpu_pool.index("--queues") + 1] == "cpu" and "deploy" not in services["worker-cpu"]
    env = services["api"]["environment"]
    assert env["MODELPRESS_BROKER_URL"].startswith("redis://")
    assert env["MODELPRESS_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert services["flower"]["profiles"] == ["monitoring"]


def test_dockerfile_has_both_targets_and_pins_torch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert set(re.findall(r"^FROM .* AS (\w+)$", text, flags=re.M)) >= {"base", "api", "worker"}
    assert "torch==2.13.0" in text
