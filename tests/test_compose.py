"""compose.yaml without a Docker engine: valid against the Compose Specification's JSON schema
(vendored in tests/data), every file it references present, and the fleet shaped as the
README says (Redis durable, GPU workers scalable, CPU and monitoring profiles)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from producer.settings import ClientSettings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "compose.yaml").read_text()))


def test_compose_file_matches_the_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_the_schema_check_catches_mistakes(compose: dict[str, Any]) -> None:
    """The vendored schema is strict enough to be worth running."""
    validator = jsonschema.Draft201909Validator(json.loads(SCHEMA.read_text()))
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["gpu"] = 1
    broken["services"]["redis"]["healthcheck"]["intervall"] = "5s"
    assert len(list(validator.iter_errors(broken))) >= 2


def _bind_sources(service: dict[str, Any]) -> list[str]:
    out = []
    for v in service.get("volumes", []):
        src = v.split(":", 1)[0] if isinstance(v, str) else v.get("source", "")
        if src.startswith((".", "/")):
            out.append(src)
    return out


def test_every_referenced_file_exists(compose: dict[str, Any]) -> None:
    missing = []
    for name, svc in compose["services"].items():
        for src in _bind_sources(svc):
            if not (ROOT / src).exists():
                missing.append(f"{name}: volume {src}")
        build = svc.get("build")
        if isinstance(build, dict):
            ctx = ROOT / build.get("context", ".")
            if not (ctx / build.get("dockerfile", "Dockerfile")).is_file():
                missing.append(f"{name}: dockerfile {build}")
        for entry in ([svc["env_file"]] if isinstance(svc.get("env_file"), str)
                      else svc.get("env_file", [])):
            env_file = entry if isinstance(entry, str) else entry["path"]
            # .env is the user's copy of config/.env.example (git-ignored).
            path = "config/.env.example" if env_file == ".env" else env_file
            if not (ROOT / path).is_file():
                missing.append(f"{name}: env_file {env_file}")
    assert not missing
    for vol in (v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", [])
                if isinstance(v, str) and not v.startswith((".", "/"))):
        assert vol in compose["volumes"], vol
    # Files the mounted configs point at.
    provisioning = ROOT / "config/grafana/provisioning/dashboards/slotfill.yml"
    assert "/var/lib/grafana/dashboards" in provisioning.read_text()
    assert (ROOT / "config/grafana/dashboards/slotfill.json").is_file()
    assert (ROOT / "config/grafana/provisioning/datasources/prometheus.yml").is_file()


def test_fleet_shape(compose: dict[str, Any]) -> None:
    svcs = compose["services"]
    redis_svc = svcs["redis"]
    assert "./config/redis.conf" in " ".join(redis_svc["volumes"])
    assert "redis-server" in redis_svc["command"] and "healthcheck" in redis_svc
    assert any(v.endswith(":/data") for v in redis_svc["volumes"])
    conf = (ROOT / "config/redis.conf").read_text()
    assert re.search(r"^appendonly yes$", conf, re.M)
    assert re.search(r"^appendfsync (always|everysec)$", conf, re.M)
    assert re.search(r"^maxmemory-policy noeviction$", conf, re.M)

    worker = svcs["worker"]
    assert "profiles" not in worker  # `docker compose up` starts it
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N works
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["environment"]["SLOTFILL_REDIS_URL"] == "redis://redis:6379/0"
    # .env is optional: without it the workers run on the defaults (the tiny model).
    assert worker["env_file"] == [{"path": ".env", "required": False}]
    assert worker["shm_size"]  # podman-compose ignores ipc: host; vLLM needs /dev/shm
    cpu = svcs["worker-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    for name in ("prometheus", "grafana"):
        assert svcs[name]["profiles"] == ["monitoring"]
    for image in (s["image"] for s in svcs.values()):
        assert (":" in image and not image.endswith(":latest")) or image.startswith("slotfill-")


def test_dockerfiles_pin_their_base_images() -> None:
    gpu = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", gpu, re.M)
    assert base and re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", base.group(1))
    cpu = (ROOT / "Dockerfile.cpu").read_text()
    assert re.search(r"^FROM python:3\.11", cpu, re.M) and "worker-cpu" in cpu
    for text in (gpu, cpu):
        for src in re.findall(r"^COPY (\S+) ", text, re.M):
            assert (ROOT / src).exists(), src


def test_env_example_names_real_settings() -> None:
    known = {f"SLOTFILL_{n.upper()}" for n in (*ClientSettings.model_fields,
                                               *WorkerSettings.model_fields)}
    names = re.findall(r"^#?\s*(SLOTFILL_[A-Z0-9_]+)=", (ROOT / "config/.env.example").read_text(),
                       re.M)
    assert names and not set(names) - known, set(names) - known
    WorkerSettings(_env_file=ROOT / "config/.env.example")  # type: ignore[call-arg]


def test_prometheus_scrapes_the_worker_metrics_port(compose: dict[str, Any]) -> None:
    prom = yaml.safe_load((ROOT / "config/prometheus.yml").read_text())
    [job] = [j for j in prom["scrape_configs"] if j["job_name"] == "slotfill-worker"]
    sd = job["dns_sd_configs"][0]
    assert "worker" in sd["names"] and sd["port"] == 9400
    assert compose["services"]["worker"]["environment"]["SLOTFILL_METRICS_PORT"] == "9400"
