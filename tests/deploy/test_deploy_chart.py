"""The Helm chart (deploy/helm/emserve), validated offline: no helm binary, no cluster.

Pipeline, for every example values file under ``deploy/helm/emserve/ci/``:

1. ``helm lint --strict`` and rendering through helm-python-sdk (Helm's own Go SDK, bundled in the wheel),
   which also enforces ``values.schema.json``;
2. every rendered object against the Kubernetes OpenAPI schemas in strict mode (unknown fields are errors)
   with kubernetes-validate, for the oldest Kubernetes the chart supports (``kubeVersion`` in Chart.yaml)
   and the newest the validator knows. Custom resources (ServiceMonitor) have no schema there and are
   checked structurally here instead;
3. yamllint on the chart's own YAML and on the rendered stream;
4. the semantics the server depends on: the termination grace period covers the server's drain, the
   probes are gRPC health checks of the right port and service, sessions live on a per-replica PVC, the
   server listens on the pod IP, a GPU release requests GPUs and runs the CUDA image, and so on.

Dev dependencies (pyproject ``dev`` extra): helm-python-sdk, kubernetes-validate, yamllint.
"""

from __future__ import annotations

import base64
import copy
import functools
import math
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError
from kubernetes_validate.utils import ValidationError as KubeValidationError
from yamllint import linter as yamllint_linter
from yamllint.config import YamlLintConfig

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "emserve"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "emserve"
NAMESPACE = "ml"

# Kinds whose schema kubernetes-validate does not ship (custom resources): checked structurally below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

# yamllint for the chart's YAML. Helm's toYaml writes block sequences unindented ("key:\n- item"), so the
# rendered stream allows both sequence styles; everything else is yamllint's default.
YAMLLINT_CONFIG = YamlLintConfig(
    """
extends: default
rules:
  line-length: {max: 120}
  indentation: {spaces: 2, indent-sequences: whatever}
  truthy: {allowed-values: ["true", "false"], check-keys: false}
  comments: {min-spaces-from-content: 1}
"""
)


# --------------------------------------------------------------------------------------------------------
# Helpers


@functools.cache
def _chart() -> helm.Chart:
    """The chart, loaded once per test session (the handle is immutable and thread-safe)."""
    return helm.Chart.load(CHART)


def _values(path: Path) -> dict[str, Any]:
    """A values file as Helm reads it (``-f``)."""
    return helm.values_from_yaml(path.read_text()) or {}


def _render_raw(values: dict[str, Any]) -> dict[str, str]:
    """Template path -> rendered text, like ``helm template emserve CHART -n ml -f ...``."""
    return _chart().render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


@functools.cache
def _render_file(path: Path) -> dict[str, str]:
    return _render_raw(_values(path))


def _objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """The Kubernetes objects of a rendering (NOTES.txt and empty templates left out)."""
    objs = []
    for name, text in sorted(rendered.items()):
        if not name.endswith((".yaml", ".yml")):
            continue
        objs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objs


def _stream(rendered: dict[str, str]) -> str:
    """The rendering as ``helm template`` prints it: one ``---`` document per non-empty manifest."""
    parts = []
    for name, text in sorted(rendered.items()):
        if name.endswith((".yaml", ".yml")) and text.strip():
            parts.append(f"---\n# Source: {name}\n{text.rstrip()}\n")
    return "".join(parts)


def _one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def _kinds(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def _container(sts: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "emserve"]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    """Env name -> value (a string) or valueFrom (a dict)."""
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), f"duplicate env entries: {names}"
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _kube_versions() -> list[str]:
    """The chart's minimum Kubernetes (Chart.yaml kubeVersion '>=X.Y') and the newest with schemas."""
    floor = re.match(r">=\s*(\d+\.\d+)", yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"])
    assert floor, "Chart.yaml kubeVersion must be a '>=X.Y' range"
    newest = kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version())
    return sorted({floor.group(1), newest})


def _ids(paths: list[Path]) -> list[str]:
    return [p.name.removesuffix("-values.yaml") for p in paths]


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


pytestmark = pytest.mark.timeout(120)
by_values = pytest.mark.parametrize("values_file", CI_VALUES, ids=_ids(CI_VALUES))


# --------------------------------------------------------------------------------------------------------
# Lint, schema, Kubernetes validation, yamllint


def test_example_values_files_cover_the_main_setups() -> None:
    assert {p.name for p in CI_VALUES} >= {
        "cpu-values.yaml", "gpu-values.yaml", "servicemonitor-auth-values.yaml", "minimal-values.yaml"
    }


@by_values
def test_helm_lint_strict_is_clean(values_file: Path) -> None:
    for version in _kube_versions():  # also checks Chart.yaml's kubeVersion and deprecated APIs
        report = helm.lint(CHART, _values(values_file), strict=True, namespace=NAMESPACE,
                           kube_version=f"v{version}.0")
        assert report["total_charts_linted"] == 1
        assert report["errors"] == []
        # Severity 1 is informational ("icon is recommended"); warnings (2) and errors (3) fail.
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], version


def test_chart_requires_a_kubernetes_with_grpc_probes() -> None:
    """Native gRPC probes are GA (on by default) from Kubernetes 1.27: Chart.yaml must not promise less."""
    floor = tuple(int(x) for x in _kube_versions()[0].split("."))
    assert floor >= (1, 27)


def test_helm_lint_reports_a_broken_template(tmp_path: Path) -> None:
    """The lint step can fail: a copy of the chart with an unclosed action is reported as an error."""
    chart = Path(_chart().save_dir(tmp_path))
    (chart / "templates" / "broken.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {{ .Values\n")
    report = helm.lint(chart, strict=True)
    assert [m for m in report["messages"] if m["severity"] == 3] or report["errors"]


@by_values
def test_values_files_meet_the_schema(values_file: Path) -> None:
    _chart().validate_schema(_values(values_file))


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({"replicaCount": "two"}, "/replicaCount"),
        ({"replicaCount": -1}, "/replicaCount"),
        ({"server": {"graceSeconds": -1}}, "/server/graceSeconds"),
        ({"server": {"host": "127.0.0.1"}}, "/server/host"),
        ({"server": {"port": 70000}}, "/server/port"),
        ({"server": {"retrievalDevice": "tpu"}}, "/server/retrievalDevice"),
        ({"server": {"modle": "x"}}, "/server"),
        ({"replicas": 2}, ""),
        ({"gpu": {"enabled": "yes"}}, "/gpu/enabled"),
        ({"gpu": {"count": 0}}, "/gpu/count"),
        ({"persistence": {"modelCache": {"type": "nfs"}}}, "/persistence/modelCache/type"),
        ({"persistence": {"sessions": {"size": "lots"}}}, "/persistence/sessions/size"),
        ({"podDisruptionBudget": {"minAvailable": 0}}, "/podDisruptionBudget/minAvailable"),
        ({"podDisruptionBudget": {"maxUnavailable": "one"}}, "/podDisruptionBudget/maxUnavailable"),
        ({"probes": {"startup": {"failureThreshold": 0}}}, "/probes/startup/failureThreshold"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
        ({"server": {"maxDiskGiB": -1}}, "/server/maxDiskGiB"),
        ({"server": {"maxDiskGiB": "most"}}, "/server/maxDiskGiB"),
        ({"server": {"maxSessionDiskGiB": -1}}, "/server/maxSessionDiskGiB"),
    ],
)
def test_schema_rejects_bad_values(bad: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        _chart().validate_schema(bad)
    assert f"at '{where}" in str(err.value)
    # Rendering (what `helm install` does) refuses them too.
    with pytest.raises(helm.HelmValuesError):
        _render_raw(bad)


@by_values
def test_rendered_objects_are_valid_kubernetes(values_file: Path) -> None:
    objs = _objects(_render_file(values_file))
    builtin = [o for o in objs if (o["apiVersion"], o["kind"]) not in CUSTOM_KINDS]
    assert {"StatefulSet", "Service"} <= {o["kind"] for o in builtin}
    checked = 0
    for version in _kube_versions():
        for obj in objs:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
                checked += 1
            except SchemaNotFoundError:
                assert (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS, f"no schema for {obj['kind']}"
            except KubeValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid on {version}: {path}: {e.message}")
    assert checked == len(_kube_versions()) * len(builtin)  # each built-in object had a schema


def test_kubernetes_validation_catches_mistakes() -> None:
    """The validator is live in strict mode: wrong types and unknown fields in the StatefulSet fail."""
    sts = _one(_objects(_render_file(CHART / "ci" / "cpu-values.yaml")), "StatefulSet")
    version = _kube_versions()[-1]
    kubernetes_validate.validate(sts, version, strict=True)

    wrong_type = copy.deepcopy(sts)
    wrong_type["spec"]["replicas"] = "two"
    unknown_field = copy.deepcopy(sts)
    _container(unknown_field)["startupProbe"]["grpc"]["servce"] = "readiness"
    named_grpc_port = copy.deepcopy(sts)
    _container(named_grpc_port)["readinessProbe"]["grpc"]["port"] = "grpc"  # gRPC probes take numbers only
    for broken in (wrong_type, unknown_field, named_grpc_port):
        with pytest.raises(KubeValidationError):
            kubernetes_validate.validate(broken, version, strict=True)


def test_yamllint_chart_sources() -> None:
    files = [CHART / "Chart.yaml", CHART / "values.yaml", *CI_VALUES]
    problems = []
    for path in files:
        problems += [f"{path.name}:{p.line}: {p.desc}" for p in yamllint_linter.run(path.read_text(), YAMLLINT_CONFIG)]
    assert problems == []


@by_values
def test_yamllint_rendered_output(values_file: Path) -> None:
    stream = _stream(_render_file(values_file))
    problems = [f"{p.line}: {p.desc} ({p.rule})" for p in yamllint_linter.run(stream, YAMLLINT_CONFIG)]
    assert problems == [], "\n".join([*problems, stream])


def test_yamllint_config_catches_problems() -> None:
    bad = "---\nkey: value   \nlist:\n  - a\n  - a\nkey: again\n"
    rules = {p.rule for p in yamllint_linter.run(bad, YAMLLINT_CONFIG)}
    assert {"trailing-spaces", "key-duplicates"} <= rules


def test_values_schema_is_strict_json_schema() -> None:
    schema = _chart().schema
    assert schema is not None
    assert schema["additionalProperties"] is False  # a typo in a top-level key is an error
    for key in yaml.safe_load((CHART / "values.yaml").read_text()):
        assert key in schema["properties"], f"values.yaml key {key!r} missing from values.schema.json"


# --------------------------------------------------------------------------------------------------------
# What the server needs from the chart


@by_values
def test_termination_grace_period_exceeds_the_servers_drain(values_file: Path) -> None:
    values = _chart().merge_values(_values(values_file))
    sts = _one(_objects(_render_file(values_file)), "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    c = _container(sts)
    grace_s = float(_env(c)["EMSERVE_GRACE_S"])
    assert grace_s == float(values["server"]["graceSeconds"])
    prestop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    prestop_s = int(prestop[-1]) if prestop else 0
    assert prestop_s == values["lifecycle"]["preStopSleepSeconds"]
    # kubelet counts the preStop hook against the period; the server drains, then checkpoints.
    assert pod["terminationGracePeriodSeconds"] > prestop_s + grace_s
    checkpoint_s = values["lifecycle"]["checkpointSeconds"]
    assert pod["terminationGracePeriodSeconds"] == prestop_s + math.ceil(grace_s) + checkpoint_s


@pytest.mark.parametrize("grace", [0, 1, 29.5, 600])
def test_termination_grace_period_follows_the_drain_timeout(grace: float) -> None:
    sts = _one(_objects(_render_raw({"server": {"graceSeconds": grace}})), "StatefulSet")
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 5 + math.ceil(grace) + 60
    assert float(_env(_container(sts))["EMSERVE_GRACE_S"]) == grace


@by_values
def test_probes_are_grpc_health_checks_of_the_server_port(values_file: Path) -> None:
    """On the gRPC port; with TLS (which kubelet's gRPC probes cannot speak) on the plaintext health port."""
    values = _chart().merge_values(_values(values_file))
    c = _container(_one(_objects(_render_file(values_file)), "StatefulSet"))
    env = _env(c)
    port = int(env["EMSERVE_PORT"])
    assert port == values["server"]["port"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == port
    if values["server"]["tls"]["enabled"]:
        probe_port = int(env["EMSERVE_HEALTH_PORT"])
        assert probe_port == values["server"]["healthPort"] == ports["health"] != port
    else:
        probe_port = port
        assert "EMSERVE_HEALTH_PORT" not in env and "health" not in ports
    expected_service = {"startupProbe": "readiness", "readinessProbe": "readiness", "livenessProbe": ""}
    for probe, service in expected_service.items():
        spec = c[probe]
        assert set(spec) & {"httpGet", "tcpSocket", "exec"} == set(), probe
        assert spec["grpc"] == {"port": probe_port, "service": service}, probe
    # The first start converts the model and loads the engine (minutes on CPU): give it >= 15 min.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60


@by_values
def test_sessions_live_on_a_per_replica_volume_claim(values_file: Path) -> None:
    values = _chart().merge_values(_values(values_file))
    sts = _one(_objects(_render_file(values_file)), "StatefulSet")
    c = _container(sts)
    env = _env(c)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    templates = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"].get("volumes", [])}

    assert "sessions" in templates and "sessions" not in volumes
    assert mounts["sessions"] == env["EMSERVE_SESSIONS_DIR"] == "/data/sessions"
    size = templates["sessions"]["spec"]["resources"]["requests"]["storage"]
    assert size == values["persistence"]["sessions"]["size"]
    # volumeClaimTemplates are immutable: no label that changes with the chart version.
    for t in templates.values():
        assert "helm.sh/chart" not in t["metadata"].get("labels", {})
        assert "app.kubernetes.io/version" not in t["metadata"].get("labels", {})

    assert mounts["model-cache"] == env["EMSERVE_HOME"] == "/data/cache"
    kind = values["persistence"]["modelCache"]["type"]
    if kind == "volumeClaimTemplate":
        assert "model-cache" in templates and "model-cache" not in volumes
    elif kind == "emptyDir":
        assert "emptyDir" in volumes["model-cache"] and "model-cache" not in templates
    else:
        claim = volumes["model-cache"]["persistentVolumeClaim"]["claimName"]
        assert claim == values["persistence"]["modelCache"]["existingClaim"] and "model-cache" not in templates

    retention = sts["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert retention == values["persistence"]["retentionPolicy"]
    storage_class = values["persistence"]["sessions"]["storageClassName"]
    rendered_class = templates["sessions"]["spec"].get("storageClassName")
    assert rendered_class == {"": None, "-": ""}.get(storage_class, storage_class)


_QUANTITY_GIB = {"": 2**-30, "Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10, "k": 1e3 / 2**30, "M": 1e6 / 2**30,
                 "G": 1e9 / 2**30, "T": 1e12 / 2**30}


@by_values
def test_the_disk_quota_defaults_to_90_percent_of_the_sessions_volume(values_file: Path) -> None:
    values = _chart().merge_values(_values(values_file))
    env = _env(_container(_one(_objects(_render_file(values_file)), "StatefulSet")))
    size = str(values["persistence"]["sessions"]["size"])
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", size)
    assert m, size
    expected = float(m[1]) * _QUANTITY_GIB[m[2]] * 0.9
    if values["server"]["maxDiskGiB"] != "auto":
        expected = float(values["server"]["maxDiskGiB"])
    assert float(env["EMSERVE_MAX_DISK_GIB"]) == pytest.approx(expected, abs=1e-3)
    assert float(env["EMSERVE_MAX_SESSION_DISK_GIB"]) == float(values["server"]["maxSessionDiskGiB"])


@pytest.mark.parametrize(("size", "gib"), [("20Gi", 18.0), ("1Ti", 921.6), ("500M", 0.419), ("512Mi", 0.45)])
def test_the_automatic_disk_quota_reads_every_quantity_suffix(size: str, gib: float) -> None:
    sts = _one(_objects(_render_raw({"persistence": {"sessions": {"size": size}}})), "StatefulSet")
    assert float(_env(_container(sts))["EMSERVE_MAX_DISK_GIB"]) == pytest.approx(gib, abs=1e-3)
    sts = _one(_objects(_render_raw({"server": {"maxDiskGiB": 7.5}})), "StatefulSet")
    assert _env(_container(sts))["EMSERVE_MAX_DISK_GIB"] == "7.5"


@by_values
def test_server_listens_on_the_pod_ip(values_file: Path) -> None:
    values = _chart().merge_values(_values(values_file))
    c = _container(_one(_objects(_render_file(values_file)), "StatefulSet"))
    host = _env(c)["EMSERVE_HOST"]
    assert host == values["server"]["host"]
    assert host in ("0.0.0.0", "::")


def test_default_bind_address_is_all_interfaces() -> None:
    assert _env(_container(_one(_objects(_render_raw({})), "StatefulSet")))["EMSERVE_HOST"] == "0.0.0.0"


@by_values
def test_gpu_switch_requests_gpus_and_picks_the_cuda_image(values_file: Path) -> None:
    values = _chart().merge_values(_values(values_file))
    sts = _one(_objects(_render_file(values_file)), "StatefulSet")
    c = _container(sts)
    pod = sts["spec"]["template"]["spec"]
    limits = c["resources"].get("limits", {})
    app_version = _chart().metadata["appVersion"]
    if values["gpu"]["enabled"]:
        assert limits["nvidia.com/gpu"] == values["gpu"]["count"]
        assert c["image"] == f"emserve:{app_version}-cuda"
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
        assert pod.get("runtimeClassName") == (values["gpu"]["runtimeClassName"] or None)
    else:
        assert not any("gpu" in k for k in (*limits, *c["resources"].get("requests", {})))
        assert c["image"] == f"emserve:{app_version}-cpu"
        assert "runtimeClassName" not in pod


def test_gpu_values_file_really_enables_gpus() -> None:
    """Guards the example: the parametrized GPU branch above must actually run."""
    values = _chart().merge_values(_values(CHART / "ci" / "gpu-values.yaml"))
    assert values["gpu"]["enabled"] is True and values["gpu"]["count"] == 2


def test_image_digest_pins_the_image() -> None:
    digest = "sha256:" + "a" * 64
    c = _container(_one(_objects(_render_raw({"image": {"repository": "r.example/emserve", "digest": digest}})),
                        "StatefulSet"))
    assert c["image"] == f"r.example/emserve@{digest}"


@by_values
def test_services_speak_grpc_and_govern_the_statefulset(values_file: Path) -> None:
    values = _chart().merge_values(_values(values_file))
    objs = _objects(_render_file(values_file))
    sts = _one(objs, "StatefulSet")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"]: p["containerPort"] for p in _container(sts)["ports"]}
    services = {s["metadata"]["name"]: s for s in _kinds(objs, "Service")}
    headless = services[sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is values["service"]["headless"]["publishNotReadyAddresses"]
    assert len(services) == 2
    for svc in services.values():
        assert _labels_match(svc["spec"]["selector"], pod_labels)
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert ports["grpc"]["appProtocol"] == "grpc"
        for p in ports.values():
            assert p["targetPort"] in container_ports, f"{p['targetPort']} names no container port"
        assert ("metrics" in ports) is values["metrics"]["enabled"]
    assert _labels_match(sts["spec"]["selector"]["matchLabels"], pod_labels)


@by_values
def test_metrics_port_matches_the_server_setting(values_file: Path) -> None:
    values = _chart().merge_values(_values(values_file))
    c = _container(_one(_objects(_render_file(values_file)), "StatefulSet"))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    if values["metrics"]["enabled"]:
        assert int(_env(c)["EMSERVE_METRICS_PORT"]) == ports["metrics"] == values["metrics"]["port"]
    else:
        # The images turn metrics on by default (ENV EMSERVE_METRICS_PORT=9400): the chart must say off.
        assert _env(c)["EMSERVE_METRICS_PORT"] == "off" and "metrics" not in ports


@by_values
def test_servicemonitor_scrapes_the_client_service(values_file: Path) -> None:
    values = _chart().merge_values(_values(values_file))
    objs = _objects(_render_file(values_file))
    monitors = _kinds(objs, "ServiceMonitor")
    if not values["metrics"]["serviceMonitor"]["enabled"]:
        assert monitors == []
        return
    (sm,) = monitors
    # Structural checks kubernetes-validate cannot do (no schema for this custom resource).
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm["spec"]) <= {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels"}
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    for k, v in values["metrics"]["serviceMonitor"]["labels"].items():
        assert sm["metadata"]["labels"][k] == v
    selected = [s for s in _kinds(objs, "Service") if _labels_match(sm["spec"]["selector"]["matchLabels"],
                                                                    s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in selected] == [f"{RELEASE}"]  # the client Service only, not twice
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    for key in ("interval", "scrapeTimeout"):
        assert re.fullmatch(r"([0-9]+(ms|s|m|h))+", endpoint[key])
    assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings",
                             "metricRelabelings", "honorLabels"}


def test_existing_model_cache_claim_must_be_named() -> None:
    with pytest.raises(helm.HelmError, match="existingClaim is required"):
        _render_raw({"persistence": {"modelCache": {"type": "existingClaim"}}})


def test_servicemonitor_without_metrics_is_refused() -> None:
    with pytest.raises(helm.HelmError, match="needs metrics.enabled"):
        _render_raw({"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}})


@by_values
def test_auth_token_comes_from_a_secret(values_file: Path) -> None:
    values = _chart().merge_values(_values(values_file))
    objs = _objects(_render_file(values_file))
    sts = _one(objs, "StatefulSet")
    env = _env(_container(sts))
    auth = values["server"]["auth"]
    secrets = _kinds(objs, "Secret")
    if not auth["enabled"]:
        assert "EMSERVE_AUTH_TOKEN" not in env and secrets == []
        return
    ref = env["EMSERVE_AUTH_TOKEN"]["secretKeyRef"]
    assert ref["key"] == auth["secretKey"]
    if auth["existingSecret"]:
        assert ref["name"] == auth["existingSecret"] and secrets == []
    else:
        (secret,) = secrets
        assert secret["metadata"]["name"] == ref["name"]
        assert base64.b64decode(secret["data"][ref["key"]]).decode() == auth["token"]
        assert "checksum/auth" in sts["spec"]["template"]["metadata"]["annotations"]


@by_values
def test_tls_comes_from_a_tls_secret(values_file: Path) -> None:
    values = _chart().merge_values(_values(values_file))
    sts = _one(_objects(_render_file(values_file)), "StatefulSet")
    c = _container(sts)
    env = _env(c)
    tls = values["server"]["tls"]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    if not tls["enabled"]:
        assert not {k for k in env if k.startswith("EMSERVE_TLS_")} and "tls" not in volumes
        return
    assert volumes["tls"]["secret"]["secretName"] == tls["secretName"]
    mount = {m["name"]: m for m in c["volumeMounts"]}["tls"]
    assert mount["readOnly"] and mount["mountPath"] == "/etc/emserve/tls"
    assert env["EMSERVE_TLS_CERT"] == "/etc/emserve/tls/tls.crt"
    assert env["EMSERVE_TLS_KEY"] == "/etc/emserve/tls/tls.key"
    assert (env.get("EMSERVE_TLS_CLIENT_CA") == "/etc/emserve/tls/ca.crt") == tls["mutual"]


def test_example_values_include_tls() -> None:
    assert "tls-values.yaml" in {p.name for p in CI_VALUES}


def test_tls_without_a_secret_is_refused() -> None:
    with pytest.raises(helm.HelmError, match="server.tls.secretName"):
        _render_raw({"server": {"tls": {"enabled": True}}})


def test_auth_without_a_token_source_is_refused() -> None:
    with pytest.raises(helm.HelmError, match="existingSecret or server.auth.token"):
        _render_raw({"server": {"auth": {"enabled": True}}})


@by_values
def test_pod_runs_as_the_images_non_root_user(values_file: Path) -> None:
    sts = _one(_objects(_render_file(values_file)), "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 10001  # deploy/docker
    c = _container(sts)
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # Service links would put EMSERVE_PORT=tcp://... (from a Service named "emserve") into the env.
    assert pod["enableServiceLinks"] is False


@by_values
def test_shared_memory_is_a_memory_backed_volume(values_file: Path) -> None:
    sts = _one(_objects(_render_file(values_file)), "StatefulSet")
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in _container(sts)["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


@by_values
def test_disruption_budget_selects_the_pods(values_file: Path) -> None:
    values = _chart().merge_values(_values(values_file))
    objs = _objects(_render_file(values_file))
    pdbs = _kinds(objs, "PodDisruptionBudget")
    if not values["podDisruptionBudget"]["enabled"]:
        assert pdbs == []
        return
    (pdb,) = pdbs
    pod_labels = _one(objs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert _labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    budget = {k: pdb["spec"][k] for k in ("minAvailable", "maxUnavailable") if k in pdb["spec"]}
    assert len(budget) == 1


def test_names_fit_kubernetes_limits() -> None:
    """A long release name still yields valid names (pod names get -<n>, labels <= 63 characters)."""
    long_release = "a" * 53
    rendered = _chart().render(values={}, name=long_release, namespace=NAMESPACE)
    for obj in _objects(rendered):
        assert len(obj["metadata"]["name"]) <= 63
        for v in obj["metadata"].get("labels", {}).values():
            assert len(v) <= 63
    sts = _one(_objects(rendered), "StatefulSet")
    assert len(sts["metadata"]["name"]) <= 52  # + "-" + 11-character controller-revision-hash


def test_notes_name_the_endpoints() -> None:
    notes = _render_file(CHART / "ci" / "cpu-values.yaml")["emserve/templates/NOTES.txt"]
    assert f"{RELEASE}.{NAMESPACE}.svc:50051" in notes
    assert f"{RELEASE}-<n>.{RELEASE}-headless.{NAMESPACE}.svc:50051" in notes
