"""Deployment files (docs/deployment.md): the Dockerfile, docker-compose.yml and the Prometheus and Grafana
configs under docs/deploy/. No Docker engine is needed: the files are parsed, promtool (Debian package
`prometheus`) checks the scrape config and the dashboard's PromQL, and `docker compose config` runs where a
compose CLI is installed."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "docs" / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = DEPLOY / "compose.gpu.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "spectra.json"

# The server's metric names (server/metrics.py), as exposed: counters with their _total.
CONTRACT_METRICS = frozenset(
    {
        "spectra_http_requests_total",
        "spectra_prompt_tokens_total",
        "spectra_generation_tokens_total",
        "spectra_requests_finished_total",
        "spectra_adapter_loads_total",
        "spectra_adapter_evictions_total",
        "spectra_adapter_requests_total",
        "spectra_finetune_steps_total",
        "spectra_http_request_duration_seconds",
        "spectra_time_to_first_token_seconds",
        "spectra_time_per_output_token_seconds",
        "spectra_e2e_request_latency_seconds",
        "spectra_request_queue_time_seconds",
        "spectra_batch_size",
        "spectra_adapter_load_seconds",
        "spectra_queue_length",
        "spectra_requests_running",
        "spectra_adapters_registered",
        "spectra_adapters_resident",
        "spectra_adapter_bank_bytes",
        "spectra_finetune_jobs",
        "spectra_finetune_last_train_loss",
    }
)
SERIES_SUFFIXES = re.compile(r"_(bucket|sum|count|created)$")

# Each panel topic the dashboard must cover, as patterns some PromQL expression of it must match.
QUANTILES = {"0.5": "p50", "0.9": "p90", "0.99": "p99"}
QUANTILE_TOPICS = {
    "time to first token": ("spectra_time_to_first_token_seconds", QUANTILES),
    "time per output token": ("spectra_time_per_output_token_seconds", QUANTILES),
    "end-to-end latency": ("spectra_e2e_request_latency_seconds", QUANTILES),
    "adapter load latency": ("spectra_adapter_load_seconds", QUANTILES),
    "batch size": ("spectra_batch_size", {"0.5": "p50", "0.99": "p99"}),
}
TOPIC_PATTERNS: dict[str, list[str]] = {
    **{
        f"{topic} {label}": [rf"histogram_quantile\({re.escape(quantile)}, .*rate\({metric}_bucket\["]
        for topic, (metric, quantiles) in QUANTILE_TOPICS.items()
        for quantile, label in quantiles.items()
    },
    "generated tokens/s": [r"rate\(spectra_generation_tokens_total\["],
    "requests/s by route and status": [r"by \((route, status|status, route)\) \(rate\(spectra_http_requests_total\["],
    "queue length": [r"spectra_queue_length"],
    "running requests": [r"spectra_requests_running"],
    "adapters registered": [r"spectra_adapters_registered"],
    "adapters resident": [r"spectra_adapters_resident"],
    "adapter bank bytes": [r"spectra_adapter_bank_bytes"],
    "adapter loads and evictions/s": [
        r"rate\(spectra_adapter_loads_total\[",
        r"rate\(spectra_adapter_evictions_total\[",
    ],
    "fine-tuning jobs by status": [r"by \(status\) \(spectra_finetune_jobs\)"],
    "training steps/s": [r"rate\(spectra_finetune_steps_total\["],
    "last training loss": [r"spectra_finetune_last_train_loss"],
    "process RSS": [r"process_resident_memory_bytes"],
    "process CPU": [r"rate\(process_cpu_seconds_total[{\[]"],
}


# --- helpers -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions in order: continuation lines joined, comment lines dropped (as Docker does)."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation line"
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last_from = max(i for i, instruction in enumerate(instructions) if instruction.keyword == "FROM")
    return instructions[last_from:]


def values(instructions: list[Instruction], keyword: str) -> list[str]:
    return [instruction.args for instruction in instructions if instruction.keyword == keyword]


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in values(instructions, "ENV"):
        for token in shlex.split(args):
            key, sep, value = token.partition("=")
            assert sep, f"ENV {args!r}: use the KEY=VALUE form"
            env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    form = json.loads(args)
    assert isinstance(form, list) and all(isinstance(part, str) for part in form), args
    return form


def python_check_compiles(command: list[str]) -> None:
    """A `python -c CODE` health check must at least be valid Python."""
    assert command[:3] == ["CMD", "python", "-c"], command
    compile(command[3], "<healthcheck>", "exec")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume entry."""
    pairs = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), f"use the short volume syntax: {entry!r}"
        source, target, *_ = entry.split(":")
        pairs.append((source, target))
    return pairs


def mount_target(service: dict[str, Any], repo_path: str) -> str:
    matches = [target for source, target in mounts(service) if source.rstrip("/") == f"./{repo_path}"]
    assert len(matches) == 1, f"{repo_path} is not mounted once: {mounts(service)}"
    return matches[0]


def container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(entry).rsplit(":", 1)[-1]) for entry in service["ports"]}


def promtool() -> str:
    """promtool's path; a failure (not a skip) without it, since .ci/run installs it."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not on PATH: install the Debian package `prometheus` "
            "(apt-get install -y --no-install-recommends prometheus; .ci/run does this)"
        )
    return path


def dashboard_panels() -> list[dict[str, Any]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    nested = [child for panel in panels for child in panel.get("panels", [])]
    return [panel for panel in panels + nested if panel["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]


def standard_collector_series() -> set[str]:
    """Series names of prometheus_client's process and GC collectors, as the server registers them."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    return {sample.name for family in registry.collect() for sample in family.samples}


# --- docker-compose.yml -------------------------------------------------------------------------------------------


def test_compose_services_build_ports_and_volumes(compose: dict[str, Any], services: dict[str, Any]) -> None:
    assert set(services) == {"spectra", "prometheus", "grafana"}
    spectra = services["spectra"]
    assert spectra["build"]["context"] == "."
    assert (ROOT / spectra["build"]["dockerfile"]).is_file()
    assert spectra["build"]["args"]["VARIANT"] == "cpu"
    assert container_ports(spectra) == {8080}
    assert container_ports(services["prometheus"]) == {9090}
    assert container_ports(services["grafana"]) == {3000}
    assert ("spectra-data", "/data") in mounts(spectra)
    assert "SPECTRA_MODEL" in spectra["environment"]
    named = {source for service in services.values() for source, _ in mounts(service) if not source.startswith(".")}
    assert named == set(compose["volumes"]), "every named volume is declared, and every declared one used"


def test_compose_mounts_exist_in_the_repo(services: dict[str, Any]) -> None:
    binds = [source for service in services.values() for source, _ in mounts(service) if source.startswith(".")]
    assert binds, "prometheus and grafana mount their configs from the repo"
    for source in binds:
        assert (ROOT / source).exists(), f"{source} is mounted but missing"
        assert (ROOT / source).resolve().is_relative_to(DEPLOY), f"{source}: configs live under docs/deploy/"


def test_compose_images_are_pinned(services: dict[str, Any]) -> None:
    for name, image in (("prometheus", "prom/prometheus"), ("grafana", "grafana/grafana")):
        repository, _, tag = services[name]["image"].partition(":")
        assert repository == image
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin a release, not {tag or 'latest'!r}"


def test_compose_healthchecks_and_start_order(services: dict[str, Any]) -> None:
    for name, service in services.items():
        check = service["healthcheck"]
        assert check["test"][0] == "CMD" and {"interval", "timeout", "retries"} <= set(check), name
    python_check_compiles(services["spectra"]["healthcheck"]["test"])
    assert "/health" in services["spectra"]["healthcheck"]["test"][-1]
    assert services["prometheus"]["depends_on"] == {"spectra": {"condition": "service_healthy"}}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


def test_compose_gpu_override_only_switches_the_spectra_build(services: dict[str, Any]) -> None:
    override = load_yaml(GPU_OVERRIDE)["services"]
    assert set(override) == {"spectra"}
    assert override["spectra"]["build"]["args"]["VARIANT"] == "cuda"
    assert override["spectra"]["image"] != services["spectra"]["image"], "the two variants get different tags"
    (device,) = override["spectra"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def compose_cli() -> list[str] | None:
    """`docker compose` (the v2 plugin) where installed, else the standalone `docker-compose`."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


@pytest.mark.parametrize("files", [[COMPOSE_FILE], [COMPOSE_FILE, GPU_OVERRIDE]], ids=["cpu", "gpu"])
def test_compose_config_validates(files: list[Path]) -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("no compose CLI here (neither the `docker compose` plugin nor `docker-compose`)")
    args = [arg for path in files for arg in ("-f", str(path))]
    result = subprocess.run([*cli, *args, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --- Dockerfile ---------------------------------------------------------------------------------------------------


def test_dockerfile_runtime_stage() -> None:
    instructions = parse_dockerfile(ROOT / "Dockerfile")
    assert instructions[0] == Instruction("ARG", "VARIANT=cpu"), "the CPU image is the default"
    stage = final_stage(instructions)
    users = values(stage, "USER")
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the server runs as a non-root user"
    assert any(args == "/data" or exec_form(args) == ["/data"] for args in values(stage, "VOLUME"))
    env = env_of(stage)
    assert env["SPECTRA_DATA_DIR"] == "/data"
    assert env["SPECTRA_HOST"] == "0.0.0.0"
    assert "SPECTRA_MODEL" not in env, "unset SPECTRA_MODEL = the embedded default model"
    assert values(stage, "EXPOSE") == ["8080"]
    (healthcheck,) = values(stage, "HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert "--start-period=" in options
    python_check_compiles(["CMD", *exec_form(command)])
    assert "/health" in command
    assert exec_form(values(stage, "ENTRYPOINT")[-1]) == ["spectra", "serve"]


def test_dockerfile_torch_matches_the_project_pin() -> None:
    instructions = parse_dockerfile(ROOT / "Dockerfile")
    (torch_arg,) = [args for args in values(instructions, "ARG") if args.startswith("TORCH_VERSION=")]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"torch=={torch_arg.partition('=')[2]}" in project["dependencies"]
    installs = " ".join(values(instructions, "RUN"))
    assert "--index-url https://download.pytorch.org/whl/cpu" in installs
    assert "pip install --constraint /tmp/constraints.txt ." in installs


def test_dockerfile_installs_the_locked_versions(tmp_path: Path) -> None:
    """The image's constraints, made by the Dockerfile's own command from the lock: every pin but torch."""
    (step,) = [args for args in values(parse_dockerfile(ROOT / "Dockerfile"), "RUN") if "requirements.lock" in args]
    make_constraints = step.partition(" && ")[0].replace("/tmp/constraints.txt", str(tmp_path / "constraints.txt"))
    subprocess.run(["sh", "-c", make_constraints], cwd=ROOT, check=True, timeout=30)
    constraints = (tmp_path / "constraints.txt").read_text().splitlines()
    locked = re.findall(r"^([A-Za-z0-9][^ ]*==[^ ]*) \\$", (ROOT / "requirements.lock").read_text(), re.MULTILINE)
    assert constraints == [pin for pin in locked if not pin.startswith("torch==")]
    assert len(constraints) > 50


def dockerignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(part, pattern.removeprefix("**/")) for part in parts):
                return True
        elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            return True
    return False


def test_dockerfile_copies_exist_and_dockerignore_keeps_them() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert {".git", ".venv", "data", "bench/results"} <= set(patterns)
    copies = [args for args in values(parse_dockerfile(ROOT / "Dockerfile"), "COPY") if not args.startswith("--")]
    sources = [source for args in copies for source in args.split()[:-1]]
    assert {"pyproject.toml", "README.md", "server", "adapters_store", "clients"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: missing"
        assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"


# --- Prometheus and Grafana ---------------------------------------------------------------------------------------


def test_prometheus_scrapes_spectra_every_5s(services: dict[str, Any]) -> None:
    config = DEPLOY / "prometheus.yml"
    assert mount_target(services["prometheus"], "docs/deploy/prometheus.yml") == "/etc/prometheus/prometheus.yml"
    (job,) = load_yaml(config)["scrape_configs"]
    assert job["job_name"] == "spectra"  # the dashboard's process panels filter on it
    assert job["scrape_interval"] == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (port,) = container_ports(services["spectra"])
    assert job["static_configs"] == [{"targets": [f"spectra:{port}"]}]
    result = subprocess.run([promtool(), "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_matches_the_mounts(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    assert mount_target(grafana, "docs/deploy/grafana/provisioning") == "/etc/grafana/provisioning"
    dashboards_dir = mount_target(grafana, "docs/deploy/grafana/dashboards")
    (provider,) = load_yaml(DEPLOY / "grafana/provisioning/dashboards/spectra.yml")["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == dashboards_dir
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dashboards_dir}/spectra.json"
    assert "GF_SECURITY_ADMIN_PASSWORD" in grafana["environment"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    (datasource,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    (port,) = container_ports(services["prometheus"])
    assert datasource["type"] == "prometheus" and datasource["url"] == f"http://prometheus:{port}"
    for panel in dashboard_panels():
        assert panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]


def test_dashboard_layout() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "spectra"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_uses_only_contract_metrics() -> None:
    standard = standard_collector_series()
    assert "process_resident_memory_bytes" in standard, "the process collector reads /proc (Linux)"
    for expr in dashboard_exprs():
        for name in re.findall(r"\bspectra_\w+", expr):
            assert SERIES_SUFFIXES.sub("", name) in CONTRACT_METRICS, f"{name} in {expr!r}"
        for name in re.findall(r"\b(?:process|python_gc)_\w+", expr):
            assert name in standard, f"{name} in {expr!r}"


@pytest.mark.parametrize("topic", sorted(TOPIC_PATTERNS))
def test_dashboard_covers(topic: str) -> None:
    exprs = dashboard_exprs()
    for pattern in TOPIC_PATTERNS[topic]:
        assert any(re.search(pattern, expr) for expr in exprs), f"no panel for {topic}: {pattern}"


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Each expression as a recording rule, Grafana's interval variable replaced, through promtool."""
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": expr.replace("$__rate_interval", "1m")}
        for i, expr in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_ray_serve_config_is_a_valid_serve_deploy_config_of_spectra_settings() -> None:
    """docs/deploy/ray-serve.yaml parses as Ray's own `serve deploy` schema, and its builder takes its args."""
    from ray.serve.schema import ServeDeploySchema

    from server.cluster.application import build

    config = ServeDeploySchema.model_validate(load_yaml(DEPLOY / "ray-serve.yaml"))
    (application,) = config.applications
    assert application.import_path == f"{build.__module__}:{build.__name__}"
    assert application.route_prefix == "/"
    build(application.args)  # validates them as ServerSettings and binds the two deployments
