"""The Helm chart in k8s/: rendered, linted and validated offline (k8s/check.py), plus the
contracts the manifests must keep with the front end, Triton and the dashboard.

No cluster and no network: Helm's Go SDK (helm-python-sdk) renders, kubernetes-validate
holds the Kubernetes 1.31 schemas. A few seconds in all.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
_spec = importlib.util.spec_from_file_location("k8s_check", K8S / "check.py")
check = importlib.util.module_from_spec(_spec)
sys.modules["k8s_check"] = check  # dataclasses look their module up there
_spec.loader.exec_module(check)

# The metric names the front end and Triton export (docs and the design brief).
ONEREC_METRICS = {
    "onerec_requests_total",
    "onerec_request_latency_seconds_bucket",
    "onerec_stage_latency_seconds_bucket",
    "onerec_qps",
    "onerec_model_flops_total",
    "onerec_mfu",
    "onerec_peak_flops",
    "onerec_fallback_total",
    "onerec_shed_total",
    "onerec_illegal_items_total",
}
TRITON_METRICS = {
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_gpu_utilization",
}
# What `onerec serve` reads (server/app.py): the ConfigMap may set nothing else.
SETTINGS = set(re.findall(r'_env\("(ONEREC_[A-Z_]+)"', (ROOT / "server" / "app.py").read_text()))


@cache
def report(profile: str) -> check.Report:
    return check.check(profile)


def objects(profile: str, overrides: dict[str, Any] | None = None) -> dict[str, dict]:
    objs = report(profile).objects if overrides is None else check.check(profile, overrides).objects
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objs}


def container(deployment: dict, name: str) -> dict:
    (c,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


# ---------------------------------------------------------------------------------------
# The check itself: both profiles pass, and it can fail.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", check.PROFILES)
def test_profile_renders_lints_and_validates_strictly(profile: str) -> None:
    r = report(profile)
    assert r.ok, "\n".join(r.errors)
    kinds = {o["kind"] for o in r.objects}
    expected = {
        "Deployment",
        "Service",
        "ConfigMap",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceAccount",
    }
    assert expected <= kinds
    assert len(r.validated) + len(r.skipped) == len(r.objects)
    # Only listed CRDs are skipped, never a built-in kind.
    assert all(s.startswith("ServiceMonitor/") for s in r.skipped)


BROKEN = {
    # A typo in a Kubernetes field passed through values: only the strict schema sees it.
    "k8s field typo": (
        {"frontend": {"podSecurityContext": {"runAsNonroot": True}}},
        "runAsNonroot",
    ),
    "k8s wrong type": (
        {"triton": {"tolerations": [{"key": "a", "operator": "Exists", "tolerationSeconds": "x"}]}},
        "tolerationSeconds",
    ),
    "env typo": ({"frontend": {"extraEnv": [{"name": "X", "valu": "1"}]}}, "valu"),
    # A typo in the chart's own values: values.schema.json rejects it (Helm would ignore it).
    "values typo": ({"triton": {"gpu": 1}}, "gpu"),
    "resources typo": ({"frontend": {"resources": {"requets": {"cpu": "1"}}}}, "requets"),
    "unknown source": ({"modelRepository": {"source": "s3"}}, "source"),
    "port as string": ({"triton": {"ports": {"grpc": "8001"}}}, "grpc"),
    # A template that cannot render: the PVC source without a claim.
    "pvc without claim": ({"modelRepository": {"source": "pvc"}}, "claimName"),
    # A drain longer than Kubernetes waits before SIGKILL.
    "drain past the grace period": (
        {"frontend": {"settings": {"drainSeconds": 20.5, "graceSeconds": 9.6}}},
        "terminationGracePeriodSeconds",
    ),
}


@pytest.mark.parametrize("name", BROKEN)
def test_broken_override_is_rejected(name: str) -> None:
    overrides, needle = BROKEN[name]
    r = check.check("values-cpu.yaml", overrides)
    assert not r.ok
    assert any(needle in e for e in r.errors), r.errors


def test_cli_exits_nonzero_on_a_broken_values_file(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("frontend:\n  podSecurityContext:\n    runAsNonroot: true\n")
    assert check.main(["-f", str(bad), "--profile", "values-cpu.yaml"]) == 1
    assert "ERROR" in capsys.readouterr().out
    assert check.main(["--profile", "values-cpu.yaml"]) == 0


def test_unlisted_kind_without_schema_is_an_error_not_a_skip() -> None:
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    error = check.validate(widget)
    assert error is not None and "Widget" in error
    assert ("example.com/v1", "Widget") not in check.SKIPPED_KINDS


def test_service_monitor_is_behind_its_toggle() -> None:
    assert not any(k.startswith("ServiceMonitor/") for k in objects("values-cpu.yaml"))
    on = check.check("values-cpu.yaml", {"serviceMonitor": {"enabled": True}})
    assert on.ok and sorted(on.skipped) == [
        "ServiceMonitor/onerec-frontend",
        "ServiceMonitor/onerec-triton",
    ]


@pytest.mark.parametrize(
    "overrides",
    [
        {"modelRepository": {"source": "pvc", "pvc": {"claimName": "models"}}},
        {"modelRepository": {"source": "url", "url": {"location": "https://example.com/m.tgz"}}},
        {"frontend": {"tls": {"existingSecret": "tls"}, "auth": {"existingSecret": "token"}}},
        {"frontend": {"autoscaling": {"enabled": False}}, "networkPolicy": {"enabled": False}},
    ],
    ids=["pvc", "url", "tls+auth", "no-hpa-no-netpol"],
)
def test_other_value_paths_validate(overrides: dict) -> None:
    r = check.check("values-cpu.yaml", overrides)
    assert r.ok, "\n".join(r.errors)


# ---------------------------------------------------------------------------------------
# Contracts with the front end and Triton.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", check.PROFILES)
def test_frontend_runs_the_serve_contract_with_native_grpc_probes(profile: str) -> None:
    objs = objects(profile)
    fe = container(objs["Deployment/onerec-frontend"], "frontend")
    assert fe["args"] == [
        "serve",
        "--triton-url",
        "dns:///onerec-triton-headless:8001",
        "--artifacts",
        "/models/artifacts",
        "--repository",
        "/models/repository",
    ]
    assert {p["name"]: p["containerPort"] for p in fe["ports"]} == {"grpc": 50051, "metrics": 9464}
    # Routed on "" (answers, maybe degraded), so a Triton outage keeps the fallback reachable.
    assert fe["readinessProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert fe["livenessProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert fe["resources"]["requests"] and fe["resources"]["limits"]
    assert fe["securityContext"]["readOnlyRootFilesystem"] is True
    pod = objs["Deployment/onerec-frontend"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The front end reads the catalog and artefacts from the same source as Triton.
    (models,) = [v for v in pod["volumes"] if v["name"] == "models"]
    triton_pod = objs["Deployment/onerec-triton"]["spec"]["template"]["spec"]
    assert models == next(v for v in triton_pod["volumes"] if v["name"] == "models")
    settings = objs["ConfigMap/onerec-frontend"]["data"]
    assert set(settings) <= SETTINGS
    # Calls are balanced over every Triton pod: the URL names the headless Service.
    assert settings["ONEREC_TRITON_URL"] == "dns:///onerec-triton-headless:8001"
    assert objs["Service/onerec-triton-headless"]["spec"]["clusterIP"] == "None"
    drain = float(settings["ONEREC_DRAIN_S"]) + float(settings["ONEREC_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > drain
    assert settings["ONEREC_PORT"] == "50051" and settings["ONEREC_METRICS_PORT"] == "9464"


def test_tls_switches_probes_to_tcp() -> None:
    objs = objects("values-cpu.yaml", {"frontend": {"tls": {"existingSecret": "tls"}}})
    fe = container(objs["Deployment/onerec-frontend"], "frontend")
    assert "tcpSocket" in fe["readinessProbe"] and "grpc" not in fe["readinessProbe"]
    data = objs["ConfigMap/onerec-frontend"]["data"]
    assert data["ONEREC_TLS_CERT"] == "/etc/onerec/tls/tls.crt"


@pytest.mark.parametrize("profile", check.PROFILES)
def test_triton_probes_shm_and_gpu(profile: str) -> None:
    dep = objects(profile)["Deployment/onerec-triton"]
    t = container(dep, "triton")
    assert t["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert t["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert t["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {p["name"]: p["containerPort"] for p in t["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }
    assert "--model-repository=/models/repository" in t["args"]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in t["volumeMounts"]
    gpus = t["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == (1 if profile == "values-gpu.yaml" else None)


def test_triton_release_pin_matches_the_image_and_the_stub() -> None:
    values = yaml.safe_load((K8S / "values.yaml").read_text())["triton"]
    assert (values["ngcRelease"], values["tritonVersion"], values["pythonVersion"]) == (
        "24.10",
        "2.51.0",
        "3.10",
    )
    dockerfile = (K8S / "Dockerfile.triton").read_text()
    assert f"nvcr.io/nvidia/tritonserver:{values['ngcRelease']}-py3" in dockerfile
    assert "sys.version_info[:2] == (3, 10)" in dockerfile


def test_hpa_scales_on_qps_per_pod_with_cpu_fallback() -> None:
    for profile in check.PROFILES:
        hpa = objects(profile)["HorizontalPodAutoscaler/onerec-frontend"]["spec"]
        types = [
            (m["type"], m.get("pods", m.get("resource", {})).get("metric", {}).get("name"))
            for m in hpa["metrics"]
        ]
        assert types == [("Pods", "onerec_qps"), ("Resource", None)]
        assert hpa["metrics"][1]["resource"]["name"] == "cpu"
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    exposed = {r["name"]["as"] for r in adapter["rules"]["custom"]}
    triton_hpa = objects("values-gpu.yaml")["HorizontalPodAutoscaler/onerec-triton"]["spec"]
    wanted = {"onerec_qps", triton_hpa["metrics"][0]["pods"]["metric"]["name"]}
    assert wanted <= exposed


@pytest.mark.parametrize("profile", check.PROFILES)
def test_services_pdbs_and_network_policy_select_the_right_pods(profile: str) -> None:
    objs = objects(profile)
    pods = {
        c: objs[f"Deployment/onerec-{c}"]["spec"]["template"]["metadata"]["labels"]
        for c in ("frontend", "triton")
    }

    def selects(selector: dict, component: str) -> bool:
        return selector.items() <= pods[component].items()

    for c in pods:
        assert selects(objs[f"Service/onerec-{c}"]["spec"]["selector"], c)
        assert selects(
            objs[f"PodDisruptionBudget/onerec-{c}"]["spec"]["selector"]["matchLabels"], c
        )
        names = {p["name"] for p in container(objs[f"Deployment/onerec-{c}"], c)["ports"]}
        assert {p["targetPort"] for p in objs[f"Service/onerec-{c}"]["spec"]["ports"]} <= names
    np = objs["NetworkPolicy/onerec-triton"]["spec"]
    assert selects(np["podSelector"]["matchLabels"], "triton")
    assert not selects(np["podSelector"]["matchLabels"], "frontend")
    calls, scrape = np["ingress"]
    assert selects(calls["from"][0]["podSelector"]["matchLabels"], "frontend")
    assert [p["port"] for p in calls["ports"]] == [8001]
    assert [p["port"] for p in scrape["ports"]] == [8002]


# ---------------------------------------------------------------------------------------
# Dashboard and images.
# ---------------------------------------------------------------------------------------


def test_dashboard_uses_only_exported_metrics_and_covers_the_brief() -> None:
    dash = json.loads((K8S / "dashboards" / "onerec.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = set(re.findall(r"\b((?:onerec|nv)_[a-z_]+)\b", " ".join(exprs)))
    assert used <= ONEREC_METRICS | TRITON_METRICS, used - ONEREC_METRICS - TRITON_METRICS
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("qps", "p50", "p99", "mfu", "fallback", "shed", "queue", "compute", "batch"):
        assert topic in titles, topic
    cm = objects("values-gpu.yaml")["ConfigMap/onerec-dashboard"]
    assert json.loads(cm["data"]["onerec.json"]) == dash


def test_images_follow_pyproject() -> None:
    (torch,) = re.findall(r'^\s*"(torch==[^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    protoc = "grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=."
    for name in ("Dockerfile.frontend", "Dockerfile.triton"):
        text = (K8S / name).read_text()
        assert torch in text, f"{name} must pin {torch} as pyproject does"
        assert "['project']['dependencies']" in text, f"{name} must install pyproject's list"
        assert protoc in text and "protos/onerec/v1/recommender.proto" in text
        assert re.search(r"^USER 10001:10001$", text, re.M), f"{name} must run as uid 10001"
    assert "FROM python:${PYTHON_VERSION}" in (K8S / "Dockerfile.frontend").read_text()
    assert "ARG PYTHON_VERSION=3.11" in (K8S / "Dockerfile.frontend").read_text()
