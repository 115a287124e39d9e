"""Offline checks of the deployment files under deploy/ (all but deploy/kafka).

Every file parses; the Kubernetes core objects validate against the bundled OpenAPI schemas
(kubernetes-validate, no cluster needed); probes, selectors, secrets and the KEDA target
agree with each other; Dockerfiles and the compose file have the shape the runbook relies
on; every metric the dashboard and the alert rules use is one the processor exports, and
every PromQL expression parses; every alert's runbook link lands on a heading of
deploy/README.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import promql_parser
import pytest
import yaml  # type: ignore[import-untyped]

from stream.config import load_config
from stream.ops.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
README = DEPLOY / "README.md"
KUBERNETES_VERSION = "1.30"
CORE_KINDS = {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"}
METRICS_PORT = 9400

# The metrics the processor exports (name -> type); nothing else may be referenced.
METRICS = {
    "lattice_atoms_in_total": "counter",
    "lattice_embeddings_out_total": "counter",
    "lattice_tombstones_out_total": "counter",
    "lattice_dead_letters_total": "counter",
    "lattice_model_dead_letters_total": "counter",
    "lattice_truncated_total": "counter",
    "lattice_batch_atoms": "histogram",
    "lattice_window_seconds": "histogram",
    "lattice_backfill_step_seconds": "histogram",
    "lattice_embed_seconds": "histogram",
    "lattice_consumer_lag": "gauge",
    "lattice_routing_phase": "gauge",
    "lattice_migration_progress_ratio": "gauge",
    "lattice_backfill_events_total": "counter",
    "lattice_rollback_window_remaining_seconds": "gauge",
    "lattice_ready": "gauge",
    "lattice_control_offset": "gauge",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
ALERTS = {
    "LatticeConsumerLagHigh",
    "LatticeDeadLetterRate",
    "LatticeMigrationStuck",
    "LatticeRollbackWindowClosing",
    "LatticeNotReady",
}


def deploy_files() -> list[Path]:
    return sorted(
        p
        for p in DEPLOY.rglob("*")
        if p.is_file() and (DEPLOY / "kafka") not in p.parents and "__pycache__" not in p.parts
    )


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def k8s_docs() -> dict[str, list[dict[str, Any]]]:
    return {p.name: yaml_docs(p) for p in sorted(K8S.glob("*.yaml"))}


def one(name: str, kind: str) -> dict[str, Any]:
    docs = [d for d in yaml_docs(K8S / name) if d["kind"] == kind]
    assert len(docs) == 1, f"{name}: expected one {kind}"
    return docs[0]


def deployments() -> list[dict[str, Any]]:
    return [one("deployment.yaml", "Deployment"), one("deployment-gpu.yaml", "Deployment")]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def kustomization() -> dict[str, Any]:
    (doc,) = yaml_docs(K8S / "kustomization.yaml")
    return doc


def check_lattice_env(names_values: dict[str, str], where: str) -> None:
    """Every LATTICE_* variable must name a real setting (an unknown one is exit 2)."""
    env = {k: v for k, v in names_values.items() if k.startswith("LATTICE_")}
    try:
        load_config(None, environ=env)
    except Exception as exc:
        pytest.fail(f"{where}: environment {sorted(env)} rejected: {exc}")


# ---------------------------------------------------------------------------------------
# every file parses


def test_every_deploy_file_is_known_and_parses() -> None:
    files = deploy_files()
    assert files, "deploy/ has no files"
    for path in files:
        rel = path.relative_to(ROOT)
        text = path.read_text(encoding="utf-8")
        assert text.strip(), f"{rel} is empty"
        if path.suffix in {".yaml", ".yml"}:
            assert yaml_docs(path), f"{rel} has no YAML document"
        elif path.suffix == ".json":
            json.loads(text)
        elif path.suffix == ".toml":
            tomllib.loads(text)
        elif path.name.startswith("Dockerfile") or path.suffix == ".md":
            pass
        elif text.startswith("#!/usr/bin/env bash"):
            subprocess.run(["bash", "-n", str(path)], check=True, timeout=10)
        else:
            pytest.fail(f"{rel}: no check for this kind of file; extend tests/unit/test_deploy.py")


def test_expected_files_exist() -> None:
    for rel in [
        "docker/Dockerfile",
        "docker/Dockerfile.cuda",
        "compose/docker-compose.yml",
        "compose/lattice.toml",
        "k8s/configmap.yaml",
        "k8s/deployment.yaml",
        "k8s/deployment-gpu.yaml",
        "k8s/pdb.yaml",
        "k8s/service.yaml",
        "k8s/keda-scaledobject.yaml",
        "k8s/kustomization.yaml",
        "grafana/lattice-embed.json",
        "prometheus/alerts.yaml",
        "README.md",
    ]:
        assert (DEPLOY / rel).is_file(), f"deploy/{rel} missing"


# ---------------------------------------------------------------------------------------
# Kubernetes


def test_k8s_documents_have_identity_and_no_namespace() -> None:
    for name, docs in k8s_docs().items():
        for doc in docs:
            assert doc.get("apiVersion"), f"{name}: apiVersion missing"
            assert doc.get("kind"), f"{name}: kind missing"
            if doc["kind"] == "Kustomization":
                continue
            assert doc.get("metadata", {}).get("name"), f"{name}: metadata.name missing"
            assert "namespace" not in doc["metadata"], f"{name}: manifests are namespace-agnostic"


def test_core_kinds_validate_against_kubernetes_schemas() -> None:
    seen: set[str] = set()
    errors: list[str] = []
    for name, docs in k8s_docs().items():
        for doc in docs:
            if doc["kind"] not in CORE_KINDS:
                continue
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{name} {doc['kind']}: {path}: {exc.message}")
            seen.add(doc["kind"])
    assert not errors, "\n".join(errors)
    assert seen == CORE_KINDS


def test_kustomization_lists_existing_files() -> None:
    kust = kustomization()
    assert kust["apiVersion"].startswith("kustomize.config.k8s.io/")
    resources = kust["resources"]
    assert len(resources) == len(set(resources))
    for resource in resources:
        assert (K8S / resource).is_file(), f"kustomization lists missing {resource}"
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == manifests - {"deployment-gpu.yaml"}
    image_names = {image["name"] for image in kust.get("images", [])}
    cpu_image = container(one("deployment.yaml", "Deployment"))["image"]
    assert cpu_image.split(":")[0] in image_names


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["metadata"]["name"])
def test_deployment_probes_security_and_shutdown(deployment: dict[str, Any]) -> None:
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    c = container(deployment)
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["terminationGracePeriodSeconds"] == 60

    ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
    assert METRICS_PORT in ports.values()

    def probe_target(probe: str) -> tuple[str, int]:
        http = c[probe]["httpGet"]
        port = http["port"]
        return http["path"], ports[port] if isinstance(port, str) else port

    assert probe_target("livenessProbe") == ("/healthz", METRICS_PORT)
    assert probe_target("readinessProbe") == ("/readyz", METRICS_PORT)
    assert probe_target("startupProbe")[1] == METRICS_PORT
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180, "model load needs time"

    assert c["args"][:3] == ["run", "--config", "/etc/lattice-embed/lattice.toml"]

    pod_sc, c_sc = pod.get("securityContext", {}), c.get("securityContext", {})
    assert pod_sc.get("runAsNonRoot") is True or c_sc.get("runAsNonRoot") is True
    uid = c_sc.get("runAsUser", pod_sc.get("runAsUser"))
    assert isinstance(uid, int) and uid > 0
    assert c_sc["readOnlyRootFilesystem"] is True
    assert c_sc["allowPrivilegeEscalation"] is False

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    config_volume = volumes[mounts["/etc/lattice-embed/lattice.toml"]]
    configmap = one("configmap.yaml", "ConfigMap")
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    for name in mounts.values():
        assert name in volumes

    for key in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][key])

    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"

    env = {e["name"]: e for e in c["env"]}
    password = env["LATTICE_KAFKA_SASL_PLAIN_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password["name"] == "lattice-embed-kafka"
    check_lattice_env({k: e.get("value", "secret") for k, e in env.items()}, "deployment")


def test_gpu_deployment_requests_a_gpu_and_runs_cuda() -> None:
    gpu = one("deployment-gpu.yaml", "Deployment")
    cpu = one("deployment.yaml", "Deployment")
    assert gpu["metadata"]["name"] != cpu["metadata"]["name"]
    c = container(gpu)
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["LATTICE_RUNTIME_DEVICE"] == "cuda"
    assert "cuda" in c["image"]
    pod = gpu["spec"]["template"]["spec"]
    assert pod.get("nodeSelector") or pod.get("tolerations")
    assert "nvidia.com/gpu" not in container(cpu)["resources"].get("limits", {})


def test_pdb_and_service_select_the_deployments() -> None:
    pdb = one("pdb.yaml", "PodDisruptionBudget")
    service = one("service.yaml", "Service")
    assert pdb["spec"]["minAvailable"] == 1
    pdb_selector = pdb["spec"]["selector"]["matchLabels"]
    service_selector = service["spec"]["selector"]
    for deployment in deployments():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert pdb_selector.items() <= labels.items(), deployment["metadata"]["name"]
        assert service_selector.items() <= labels.items(), deployment["metadata"]["name"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == METRICS_PORT
    target = port["targetPort"]
    c = container(one("deployment.yaml", "Deployment"))
    assert target in {p.get("name") for p in c["ports"]} | {METRICS_PORT}


def test_keda_scaledobject_targets_the_deployment() -> None:
    scaled = one("keda-scaledobject.yaml", "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] == one("deployment.yaml", "Deployment")["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    pdb = one("pdb.yaml", "PodDisruptionBudget")
    assert spec["minReplicaCount"] > pdb["spec"]["minAvailable"], "drains must stay possible"
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == "lattice-embed"
    assert meta["topic"] == "atoms"
    assert int(meta["lagThreshold"]) > 0
    text = (K8S / "keda-scaledobject.yaml").read_text(encoding="utf-8")
    assert "partition" in text, "maxReplicaCount must be documented as <= partitions"

    auth = one("keda-scaledobject.yaml", "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    secrets = {ref["parameter"]: ref["name"] for ref in auth["spec"]["secretTargetRef"]}
    assert secrets["password"] == "lattice-embed-kafka"

    # the scaler's Kafka settings agree with the processor's
    config = tomllib.loads(one("configmap.yaml", "ConfigMap")["data"]["lattice.toml"])
    assert meta["bootstrapServers"] == config["kafka"]["bootstrap_servers"]
    assert config["kafka"].get("group_id", "lattice-embed") == meta["consumerGroup"]


# ---------------------------------------------------------------------------------------
# configuration files


def config_texts() -> dict[str, str]:
    configmap = one("configmap.yaml", "ConfigMap")
    return {
        "k8s/configmap.yaml": configmap["data"]["lattice.toml"],
        "compose/lattice.toml": (DEPLOY / "compose/lattice.toml").read_text(encoding="utf-8"),
        "docker/lattice.toml": (DEPLOY / "docker/lattice.toml").read_text(encoding="utf-8"),
    }


@pytest.mark.parametrize("where", sorted(config_texts()))
def test_config_files_load(where: str, tmp_path: Path) -> None:
    raw = tomllib.loads(config_texts()[where])
    assert raw["metrics"]["port"] == METRICS_PORT
    assert raw.get("kafka", {}).get("group_id", "lattice-embed") == "lattice-embed"
    path = tmp_path / "lattice.toml"
    path.write_bytes(toml_dump(raw).encode())
    config = load_config(path, environ={})
    assert config.routing.stable_model in config.models


def toml_dump(raw: dict[str, Any]) -> str:
    """A small TOML writer for the tables-of-scalars shape of lattice.toml."""

    def tables(prefix: str, table: dict[str, Any]) -> list[str]:
        lines = [f"[{prefix}]"] if prefix else []
        nested = []
        for key, value in table.items():
            if isinstance(value, dict):
                nested.append((f"{prefix}.{key}" if prefix else key, value))
            else:
                lines.append(f"{key} = {json.dumps(value)}")
        for name, sub in nested:
            lines.extend(tables(name, sub))
        return lines

    return "\n".join(tables("", raw)) + "\n"


# ---------------------------------------------------------------------------------------
# Docker


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        op, _, args = current.partition(" ")
        instructions.append((op.upper(), args.strip()))
        current = ""
    assert not current, f"{path}: dangling continuation"
    return instructions


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_shape(name: str) -> None:
    path = DEPLOY / "docker" / name
    instructions = dockerfile_instructions(path)
    ops = [op for op, _ in instructions]
    froms = [args for op, args in instructions if op == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    defaults = {}
    for op, args in instructions[: ops.index("FROM")]:
        if op == "ARG" and "=" in args:
            key, _, value = args.partition("=")
            defaults[key] = value
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], f.split()[0]) for f in froms]
    for base in bases:
        assert "$" not in base and ":" in base, f"{name}: base image {base} not pinned"

    last_from = max(i for i, op in enumerate(ops) if op == "FROM")
    final = instructions[last_from:]
    users = [args for op, args in final if op == "USER"]
    assert users, f"{name}: the runtime stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"{name}: USER must be a numeric non-root UID"
    assert ("EXPOSE", str(METRICS_PORT)) in final
    healthcheck = " ".join(args for op, args in final if op == "HEALTHCHECK")
    assert "/healthz" in healthcheck and "urllib" in healthcheck and "curl" not in healthcheck
    (entrypoint,) = [json.loads(args) for op, args in final if op == "ENTRYPOINT"]
    assert entrypoint == ["lattice-embed"]
    (cmd,) = [json.loads(args) for op, args in final if op == "CMD"]
    assert cmd[:2] == ["run", "--config"]
    assert any(op == "COPY" and "--from=" in args for op, args in final)

    # COPY sources from the build context (the repository root) exist and are not ignored
    ignored = dockerignore()
    for op, args in instructions:
        if op != "COPY" or "--from=" in args:
            continue
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"{name}: COPY {source} not in the repository"
            assert source.rstrip("/") not in ignored, f"{name}: COPY {source} is dockerignored"

    text = path.read_text(encoding="utf-8")
    if name == "Dockerfile":
        assert "ARG TORCH_INDEX_URL" in text
    else:
        assert all(base.startswith("nvidia/cuda:") for base in bases)
        assert "LATTICE_RUNTIME_DEVICE=cuda" in text
    env_names = set(re.findall(r"\b(LATTICE_[A-Z_]+)=", text))
    check_lattice_env(dict.fromkeys(env_names, "cuda"), name)


def dockerignore() -> set[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return {line.strip().rstrip("/") for line in lines if line.strip() and line[0] != "#"}


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = dockerignore()
    assert {".kafka", "bench-results", ".git"} <= ignored


# ---------------------------------------------------------------------------------------
# Compose


def test_compose_services() -> None:
    compose_dir = DEPLOY / "compose"
    (compose,) = yaml_docs(compose_dir / "docker-compose.yml")
    services = compose["services"]
    assert {"kafka", "processor", "demo-producer"} <= set(services)

    kafka = services["kafka"]
    assert re.fullmatch(r"apache/kafka:3\.9\.\d+", kafka["image"])
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    assert kafka["healthcheck"]["test"]

    processor = services["processor"]
    build = processor["build"]
    context = (compose_dir / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DEPLOY / "docker/Dockerfile"
    assert processor["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert processor["command"][0] == "run"
    config_mounts = [
        v for v in processor["volumes"] if v.split(":")[1] == "/etc/lattice-embed/lattice.toml"
    ]
    assert config_mounts, "the config must be mounted"
    assert (compose_dir / config_mounts[0].split(":")[0]).is_file()
    assert any(str(METRICS_PORT) in str(p) for p in processor["ports"])

    producer = services["demo-producer"]
    assert producer["image"] == processor["image"]
    assert producer["entrypoint"] == ["python", "-c"]
    (snippet,) = producer["command"]
    assert "$" not in snippet, "compose would interpolate $ in the snippet"
    compile(snippet, "demo-producer", "exec")
    assert '"atoms"' in snippet

    for name, service in services.items():
        env = service.get("environment") or {}
        if isinstance(env, dict):
            check_lattice_env({k: str(v) for k, v in env.items()}, f"compose {name}")


# ---------------------------------------------------------------------------------------
# metrics: dashboard and alerts


def metric_names(text: str) -> set[str]:
    names = set()
    for token in re.findall(r"\blattice_[a-z_]+", text):
        base = token
        for suffix in HISTOGRAM_SUFFIXES:
            if token.endswith(suffix) and token.removesuffix(suffix) in METRICS:
                base = token.removesuffix(suffix)
                assert METRICS[base] == "histogram", f"{token}: {base} is not a histogram"
        names.add(base)
    return names


def parse_promql(expr: str, where: str) -> None:
    concrete = (
        expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("${job}", ".*")
        .replace("$job", ".*")
    )
    assert "$" not in concrete, f"{where}: unresolved variable in {expr!r}"
    try:
        promql_parser.parse(concrete)
    except ValueError as exc:
        pytest.fail(f"{where}: PromQL does not parse ({exc}): {expr}")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (DEPLOY / "grafana/lattice-embed.json").read_text(encoding="utf-8")
    )
    return loaded


def test_dashboard_uses_only_exported_metrics_and_covers_them() -> None:
    text = (DEPLOY / "grafana/lattice-embed.json").read_text(encoding="utf-8")
    used = metric_names(text)
    assert used <= set(METRICS), f"unknown metrics: {sorted(used - set(METRICS))}"
    assert used == set(METRICS), f"not on the dashboard: {sorted(set(METRICS) - used)}"


def test_dashboard_structure_and_queries() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    exprs = 0
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            parse_promql(target["expr"], f"panel {panel['title']!r}")
            exprs += 1
    assert exprs >= 10
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ["lag", "dead letter", "latency", "batch", "phase", "progress", "backfill"]:
        assert topic in titles, f"no panel about {topic}"


def alert_rules() -> list[dict[str, Any]]:
    (doc,) = yaml_docs(DEPLOY / "prometheus/alerts.yaml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_alert_rules_use_exported_metrics_and_parse() -> None:
    text = (DEPLOY / "prometheus/alerts.yaml").read_text(encoding="utf-8")
    used = metric_names(text)
    assert used <= set(METRICS), f"unknown metrics: {sorted(used - set(METRICS))}"
    (doc,) = yaml_docs(DEPLOY / "prometheus/alerts.yaml")
    for group in doc["groups"]:
        assert group["name"] and group["rules"]
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
        parse_promql(rule["expr"], rule["alert"])
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])


def markdown_anchors(text: str) -> set[str]:
    """GitHub-style heading anchors (outside fenced code), plus explicit id= anchors."""
    anchors = set(re.findall(r'id="([^"]+)"', text))
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"#{1,6}\s+(.*)", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def test_every_alert_has_a_runbook_section() -> None:
    anchors = markdown_anchors(README.read_text(encoding="utf-8"))
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page.endswith("deploy/README.md"), f"{rule['alert']}: {url}"
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in deploy/README.md"


def test_readme_internal_links_resolve() -> None:
    text = README.read_text(encoding="utf-8")
    anchors = markdown_anchors(text)
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links
    for link in links:
        assert link in anchors, f"deploy/README.md links to missing #{link}"
    for path in re.findall(r"`((?:docker|compose|k8s|grafana|prometheus)/[\w./-]+)`", text):
        assert (DEPLOY / path).exists(), f"deploy/README.md names missing deploy/{path}"
    for command in ["start-migration", "status --watch", "rollback", "finalize", "pause"]:
        assert command in text


def test_bench_gpu_script_uses_real_flags_and_settings() -> None:
    text = (DEPLOY / "bench-gpu").read_text(encoding="utf-8")
    exports = dict(re.findall(r"export (LATTICE_[A-Z_]+)=\$\{\1:-(\w+)\}", text))
    assert len(exports) == 3, exports
    check_lattice_env(exports, "deploy/bench-gpu")
    bench = next(
        action.choices["bench"]
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    known = {flag for action in bench._actions for flag in action.option_strings}
    used = set(re.findall(r"(--[a-z][a-z-]+)", text))
    assert used and used <= known, used - known
