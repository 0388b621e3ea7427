"""The deployment files, checked for structure (no Docker engine or DigitalOcean account
runs here): docker-compose.yml, .env.example, .do/app.yaml and the Grafana dashboard,
against the README (every variable documented) and proxy/metrics.py (every metric real)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO
from prometheus_client.metrics import MetricWrapperBase

from proxy.metrics import Metrics

COMPOSE = REPO / "docker-compose.yml"
APP_SPEC = REPO / ".do" / "app.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "byok-proxy.json"
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.]*)")
# Services built from this repository's image (they read the proxy's configuration).
PROXY_IMAGE_SERVICES = ("migrate", "proxy")
SECRETS = {"ENCRYPTION_KEY", "ADMIN_TOKEN"}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def readme_section(title: str) -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end != -1 else None]


def documented_variables() -> set[str]:
    """Variables the README documents: the configuration table and the deployment table."""
    text = readme_section("Configuration") + readme_section("Production")
    return set(re.findall(r"^\| `([A-Z_][A-Z0-9_]*)` \|", text, re.M))


def env_example() -> dict[str, str]:
    lines = (REPO / ".env.example").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


# --- docker-compose.yml -------------------------------------------------------------------


def test_compose_runs_migrate_then_two_replicas_on_postgres_and_redis() -> None:
    services = load(COMPOSE)["services"]
    assert set(services) == {"postgres", "redis", "migrate", "proxy"}
    migrate, proxy = services["migrate"], services["proxy"]
    assert migrate["command"] == ["byok-proxy", "migrate"] and migrate["restart"] == "no"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert proxy["deploy"]["replicas"] == 2
    assert proxy["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    for name in PROXY_IMAGE_SERVICES:
        service = services[name]
        assert service["build"] == "." and (REPO / "Dockerfile").exists()
        env = service["environment"]
        assert env["DATABASE_URL"].startswith("postgresql+psycopg://byok:")
        assert env["DATABASE_URL"].endswith("@postgres:5432/byok")
        assert env["REDIS_URL"] == "redis://redis:6379/0"


def test_compose_healthchecks() -> None:
    services = load(COMPOSE)["services"]
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert "ping" in services["redis"]["healthcheck"]["test"]
    check = services["proxy"]["healthcheck"]
    assert "http://127.0.0.1:8080/healthz" in " ".join(check["test"])
    # Streams get server.shutdown_timeout_seconds (30 s) before the engine kills the replica.
    assert int(services["proxy"]["stop_grace_period"].rstrip("s")) > 30


def test_compose_secrets_come_from_env_and_are_required() -> None:
    services = load(COMPOSE)["services"]
    for name in PROXY_IMAGE_SERVICES:
        env = services[name]["environment"]
        for secret in SECRETS:
            assert env[secret].startswith("${" + secret + ":?"), env[secret]
    password = services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert password.startswith("${POSTGRES_PASSWORD:?")


def test_compose_variables_are_documented_and_in_env_example() -> None:
    used = set(INTERPOLATION.findall(COMPOSE.read_text()))
    assert SECRETS | {"POSTGRES_PASSWORD"} <= used
    assert used - documented_variables() == set()
    example = env_example()
    assert used - set(example) == set()
    assert all(example[name] == "" for name in SECRETS | {"POSTGRES_PASSWORD"})
    services = load(COMPOSE)["services"]
    for name in PROXY_IMAGE_SERVICES:
        assert set(services[name]["environment"]) - documented_variables() == set()


def test_env_file_is_never_committed() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", ".env"], cwd=REPO, capture_output=True, check=False
    )
    assert ignored.returncode == 0, ".env must be listed in .gitignore"
    tracked = subprocess.run(
        ["git", "ls-files", ".env"], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert tracked.stdout == ""


# --- .do/app.yaml -------------------------------------------------------------------------


def app_envs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every env entry of the app spec: app-wide, services' and jobs'."""
    envs = list(spec.get("envs", []))
    for component in spec.get("services", []) + spec.get("jobs", []):
        envs += component.get("envs", [])
    return envs


def test_app_spec_runs_two_instances_with_health_checks() -> None:
    spec = load(APP_SPEC)
    (service,) = spec["services"]
    assert service["instance_count"] == 2 and service["http_port"] == 8080
    assert (REPO / service["dockerfile_path"]).exists()
    assert service["health_check"]["http_path"] == "/healthz"
    assert service["liveness_health_check"]["http_path"] == "/healthz"
    assert spec["ingress"]["rules"][0]["component"]["name"] == service["name"]


def test_app_spec_migrates_in_a_pre_deploy_job_on_managed_postgres() -> None:
    spec = load(APP_SPEC)
    (database,) = spec["databases"]
    assert database["engine"] == "PG" and database["production"] is True
    (job,) = spec["jobs"]
    assert job["kind"] == "PRE_DEPLOY" and job["run_command"] == "byok-proxy migrate"
    (service,) = spec["services"]
    urls = [
        {e["key"]: e["value"] for e in component["envs"]}["DATABASE_URL"]
        for component in (service, job)
    ]
    assert urls[0] == urls[1] and urls[0].startswith("postgresql+psycopg://")
    for reference in INTERPOLATION.findall(urls[0]):
        assert reference.split(".")[0] == database["name"], reference


def test_app_spec_keeps_secrets_as_encrypted_secret_variables() -> None:
    envs = {e["key"]: e for e in app_envs(load(APP_SPEC))}
    for secret in SECRETS:
        assert envs[secret]["type"] == "SECRET"
    for entry in envs.values():
        if entry.get("type") == "SECRET":
            # Never a plaintext value in the repository: absent, or App Platform's EV[...].
            assert str(entry.get("value", "EV[")).startswith("EV["), entry["key"]


def test_app_spec_variables_are_documented() -> None:
    spec = load(APP_SPEC)
    keys = {e["key"] for e in app_envs(spec)}
    assert keys - documented_variables() == set()
    components = {c["name"] for kind in ("databases", "services", "jobs") for c in spec[kind]}
    for reference in INTERPOLATION.findall(APP_SPEC.read_text()):
        if "." in reference:  # a bindable variable of a component: ${db.HOSTNAME}
            assert reference.split(".")[0] in components, reference
        else:
            assert reference in documented_variables(), reference


# --- deploy/grafana/byok-proxy.json -------------------------------------------------------

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
PROMQL_WORDS |= {"and", "or", "unless", "offset"}
PROMETHEUS_LABELS = {"le", "instance", "job"}  # added by histograms and by the scrape


@pytest.fixture(scope="module")
def defined_metrics() -> dict[str, set[str]]:
    """Each series name proxy/metrics.py exports, with its label names."""
    series: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        (family,) = metric.describe()
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        for suffix in suffixes.get(family.type, [""]):
            series[family.name + suffix] = set(metric._labelnames)  # no public accessor
    return series


def promql_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels
    return [(p["title"], t["expr"]) for p in panels for t in p["targets"]]


def metrics_in(expr: str) -> set[str]:
    """The series an expression selects: identifiers outside strings, label matchers,
    ranges and grouping clauses that are not functions or keywords."""
    bare = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]', " ", expr)
    bare = re.sub(r"\b(by|without)\s*\([^)]*\)", " ", bare)
    names = re.findall(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", bare)
    return {name for name in names if name not in PROMQL_WORDS}


def labels_in(expr: str) -> set[str]:
    grouped = re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
    matched = re.findall(r"\{([^}]*)\}", expr)
    labels = {label.strip() for group in grouped for label in group.split(",")}
    for matchers in matched:
        labels |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return labels - {""}


def test_dashboard_queries_only_metrics_the_proxy_defines(
    defined_metrics: dict[str, set[str]],
) -> None:
    for title, expr in promql_exprs():
        used = metrics_in(expr)
        assert used, f"{title}: {expr} selects no metric"
        unknown = used - set(defined_metrics)
        assert not unknown, f"{title}: {sorted(unknown)} not in proxy/metrics.py"
        labels = set().union(*(defined_metrics[name] for name in used)) | PROMETHEUS_LABELS
        assert labels_in(expr) <= labels, f"{title}: {sorted(labels_in(expr) - labels)}"


def test_dashboard_shows_every_metric(defined_metrics: dict[str, set[str]]) -> None:
    shown = {name for _, expr in promql_exprs() for name in metrics_in(expr)}
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in defined_metrics}
    missing = {
        f for f in families if not any(re.sub(r"_(total|bucket)$", "", s) == f for s in shown)
    }
    assert not missing, f"add a panel for {sorted(missing)} to {DASHBOARD.name}"


def test_dashboard_variables_are_defined(defined_metrics: dict[str, set[str]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = dashboard["templating"]["list"]
    used = set(re.findall(r"\$(\w+)", DASHBOARD.read_text())) - {"__rate_interval", "__range"}
    assert used <= {v["name"] for v in variables}
    for variable in variables:
        if variable["type"] == "query":  # label_values(metric, label)
            query = variable["query"]["query"]
            assert variable["definition"] == query
            metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", query).groups()
            assert label in defined_metrics[metric], variable["name"]


# --- README -------------------------------------------------------------------------------


def test_production_section_names_the_files_and_its_links_resolve() -> None:
    section = readme_section("Production")
    for path in (COMPOSE, APP_SPEC, DASHBOARD, REPO / ".env.example"):
        assert path.exists() and str(path.relative_to(REPO)) in section, path
    headings = re.findall(r"^#+ (.+)$", (REPO / "README.md").read_text(), re.M)
    slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
    for anchor in re.findall(r"\]\(#([^)]+)\)", section):
        assert anchor in slugs, anchor
