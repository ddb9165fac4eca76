"""The Helm chart in k8s/: rendered, linted and validated offline (k8s/check.py), plus the
contracts the manifests must keep with the front end, Triton and the dashboard.

No cluster and no network: Helm's Go SDK (helm-python-sdk) renders, kubernetes-validate
holds the Kubernetes 1.31 schemas. A few seconds in all.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import tomllib
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
# What the front end reads (`onerec serve`, server/app.py, and its feature store): the
# ConfigMap and the pods' env may set nothing else.
SETTINGS = {
    name
    for path in sorted((ROOT / "server").glob("*.py"))
    for name in re.findall(r'"(ONEREC_[A-Z0-9_]+)"', path.read_text())
}


@cache
def report(profile: str) -> check.Report:
    return check.check(profile)


def objects(profile: str, overrides: dict[str, Any] | None = None) -> dict[str, dict]:
    objs = report(profile).objects if overrides is None else check.check(profile, overrides).objects
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objs}


def container(workload: dict, name: str) -> dict:
    (c,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def env(c: dict) -> dict[str, dict]:
    """A container's env by name: {"value": ...} or {"valueFrom": ...}."""
    return {e["name"]: {k: v for k, v in e.items() if k != "name"} for e in c.get("env", [])}


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


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
        "StatefulSet",
        "Secret",
        "Job",
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
    # The feature store: only the two fsync policies whose loss window values.yaml states.
    "unknown appendfsync": ({"redis": {"appendfsync": "sometimes"}}, "appendfsync"),
    "redis replicas": ({"redis": {"replicas": 3}}, "replicas"),
    "old featureStore value": (
        {"frontend": {"featureStore": {"path": "/data/features.sqlite"}}},
        "featureStore",
    ),
    "no redis at all": ({"redis": {"enabled": False}}, "externalRedis.url"),
    "both redises": (
        {"externalRedis": {"url": "redis://redis.example.com:6379/0"}},
        "redis.enabled",
    ),
    "password in the url": (
        {"redis": {"enabled": False}, "externalRedis": {"url": "redis://:hunter2@r.example.com"}},
        "password",
    ),
    "not a redis url": (
        {"redis": {"enabled": False}, "externalRedis": {"url": "http://r.example.com"}},
        "url",
    ),
    # WAIT for replicas the chart's own Redis does not have: every LogEvents would time out.
    "wait for missing replicas": (
        {"frontend": {"settings": {"redisWaitReplicas": 1}}},
        "redisWaitReplicas",
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
        {
            "redis": {
                "appendfsync": "everysec",
                "auth": {"existingSecret": "redis-auth", "passwordKey": "pw"},
                "persistence": {"storageClassName": "fast-ssd", "size": "20Gi"},
            }
        },
        {
            "redis": {"enabled": False},
            "externalRedis": {"url": "rediss://redis.example.com:6380/2"},
            "frontend": {"settings": {"redisWaitReplicas": 1}},
            "featureLoad": {"enabled": False},
        },
    ],
    ids=["pvc", "url", "tls+auth", "no-hpa-no-netpol", "redis-options", "external-redis"],
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
    assert set(env(fe)) - {"HOME"} <= SETTINGS
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
    pods = {c: pod_labels(objs[f"Deployment/onerec-{c}"]) for c in ("frontend", "triton")}
    for c in pods:
        assert selects(objs[f"Service/onerec-{c}"]["spec"]["selector"], pods[c])
        assert selects(
            objs[f"PodDisruptionBudget/onerec-{c}"]["spec"]["selector"]["matchLabels"], pods[c]
        )
        names = {p["name"] for p in container(objs[f"Deployment/onerec-{c}"], c)["ports"]}
        assert {p["targetPort"] for p in objs[f"Service/onerec-{c}"]["spec"]["ports"]} <= names
    np = objs["NetworkPolicy/onerec-triton"]["spec"]
    assert selects(np["podSelector"]["matchLabels"], pods["triton"])
    assert not selects(np["podSelector"]["matchLabels"], pods["frontend"])
    calls, scrape = np["ingress"]
    assert selects(calls["from"][0]["podSelector"]["matchLabels"], pods["frontend"])
    assert [p["port"] for p in calls["ports"]] == [8001]
    assert [p["port"] for p in scrape["ports"]] == [8002]


# ---------------------------------------------------------------------------------------
# The feature store: the chart's Redis (or an external one), the front ends stateless.
# ---------------------------------------------------------------------------------------

REDIS_URL = "redis://onerec-redis:6379/0"
EXTERNAL = {
    "redis": {"enabled": False},
    "externalRedis": {
        "url": "rediss://redis.example.com:6380/1",
        "existingSecret": "ext-redis",
        "passwordKey": "secret",
    },
}


def redis_password(objs: dict[str, dict]) -> str:
    return base64.b64decode(objs["Secret/onerec-redis"]["data"]["password"]).decode()


def arg_after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("profile", check.PROFILES)
def test_frontend_is_stateless_and_uses_the_charts_redis(profile: str) -> None:
    objs = objects(profile)
    dep = objs["Deployment/onerec-frontend"]
    pod = dep["spec"]["template"]["spec"]
    fe = container(dep, "frontend")
    # No per-pod SQLite copy: no seed init container, no data volume, nothing at /data.
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-model"]
    assert {v["name"] for v in pod["volumes"]} == {"models", "tmp"}
    assert {m["mountPath"] for m in fe["volumeMounts"]} == {"/models", "/tmp"}
    # ONEREC_FEATURE_STORE names the chart's Redis Service and its port.
    e = env(fe)
    assert e["ONEREC_FEATURE_STORE"] == {"value": REDIS_URL}
    url = urlsplit(REDIS_URL)
    svc = objs[f"Service/{url.hostname}"]["spec"]
    assert [(p["port"], p["targetPort"]) for p in svc["ports"]] == [(url.port, "redis")]
    sts = objs["StatefulSet/onerec-redis"]
    assert selects(svc["selector"], pod_labels(sts))
    assert not selects(svc["selector"], pod_labels(dep))
    assert {p["name"]: p["containerPort"] for p in container(sts, "redis")["ports"]} == {
        "redis": 6379
    }
    # The password from the chart's Secret, the WAIT settings from the ConfigMap.
    ref = e["ONEREC_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "onerec-redis", "key": "password"}
    assert re.fullmatch(r"[A-Za-z0-9]{32}", redis_password(objs))
    settings = objs["ConfigMap/onerec-frontend"]["data"]
    assert settings["ONEREC_REDIS_WAIT_REPLICAS"] == "0"
    assert settings["ONEREC_REDIS_WAIT_TIMEOUT_MS"] == "1000"
    assert "ONEREC_FEATURE_STORE" not in settings  # one source: the pod's env


@pytest.mark.parametrize("profile", check.PROFILES)
def test_redis_password_only_travels_in_its_secret(profile: str) -> None:
    objs = objects(profile)
    password = redis_password(objs)
    others = {k: o for k, o in objs.items() if k != "Secret/onerec-redis"}
    for name, obj in others.items():
        assert password not in json.dumps(obj), name
        if obj["kind"] == "ConfigMap":
            assert not any("PASSWORD" in key for key in obj["data"]), name
    redis = container(objs["StatefulSet/onerec-redis"], "redis")
    assert env(redis)["REDIS_PASSWORD"] == {
        "valueFrom": {"secretKeyRef": {"name": "onerec-redis", "key": "password"}}
    }
    # Kubernetes expands $(REDIS_PASSWORD) from the env; the manifest carries no value.
    assert arg_after(redis["args"], "--requirepass") == "$(REDIS_PASSWORD)"
    probe = " ".join(redis["readinessProbe"]["exec"]["command"])
    assert "redis-cli" in probe and "ping" in probe and "$REDIS_PASSWORD" in probe
    for workload in ("Deployment/onerec-frontend", "Job/onerec-feature-load"):
        (c,) = objs[workload]["spec"]["template"]["spec"]["containers"]
        assert "value" not in env(c)["ONEREC_REDIS_PASSWORD"], workload
    # A random password per install (lookup keeps the cluster's one on upgrade).
    assert redis_password(objects(profile, {})) != password


@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_redis_runs_the_official_image_with_aof_on_a_volume(fsync: str) -> None:
    objs = objects(
        "values-cpu.yaml", None if fsync == "always" else {"redis": {"appendfsync": fsync}}
    )
    sts = objs["StatefulSet/onerec-redis"]["spec"]
    redis = container(objs["StatefulSet/onerec-redis"], "redis")
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+-bookworm", redis["image"])  # official, pinned
    args = redis["args"]
    assert args[0] == "redis-server"
    assert arg_after(args, "--appendonly") == "yes"
    assert arg_after(args, "--appendfsync") == fsync
    assert arg_after(args, "--dir") == "/data"
    assert {"name": "data", "mountPath": "/data"} in redis["volumeMounts"]
    (claim,) = sts["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert not any(v["name"] == "data" for v in sts["template"]["spec"].get("volumes", []))
    assert sts["replicas"] == 1
    assert objs[f"Service/{sts['serviceName']}"]["spec"]["clusterIP"] == "None"
    assert "exec" in redis["readinessProbe"] and "tcpSocket" in redis["livenessProbe"]
    pod = sts["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 999
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert redis["securityContext"]["readOnlyRootFilesystem"] is True
    assert redis["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert redis["resources"]["requests"] and redis["resources"]["limits"]


def test_redis_values_document_each_fsync_loss_window() -> None:
    text = (K8S / "values.yaml").read_text()
    block = text[text.index("appendfsync sets") : text.index("appendfsync: always")]
    assert "always" in block and "everysec" in block and "one second" in block
    schema = json.loads((K8S / "values.schema.json").read_text())["properties"]["redis"]
    assert schema["properties"]["appendfsync"] == {"enum": ["always", "everysec"]}


@pytest.mark.parametrize("profile", check.PROFILES)
def test_redis_network_policy_admits_only_front_ends_and_the_loader(profile: str) -> None:
    objs = objects(profile)
    pods = {
        "redis": pod_labels(objs["StatefulSet/onerec-redis"]),
        "frontend": pod_labels(objs["Deployment/onerec-frontend"]),
        "triton": pod_labels(objs["Deployment/onerec-triton"]),
        "loader": pod_labels(objs["Job/onerec-feature-load"]),
    }
    np = objs["NetworkPolicy/onerec-redis"]["spec"]
    assert np["policyTypes"] == ["Ingress"]
    assert [c for c in pods if selects(np["podSelector"]["matchLabels"], pods[c])] == ["redis"]
    (rule,) = np["ingress"]
    assert [(p["port"], p["protocol"]) for p in rule["ports"]] == [(6379, "TCP")]
    assert all(set(peer) == {"podSelector"} for peer in rule["from"])  # no namespaces, no IPs
    admitted = {
        c
        for c in pods
        for peer in rule["from"]
        if selects(peer["podSelector"]["matchLabels"], pods[c])
    }
    assert admitted == {"frontend", "loader"}
    assert not objects(profile, {"networkPolicy": {"enabled": False}}).keys() & {
        "NetworkPolicy/onerec-redis",
        "NetworkPolicy/onerec-triton",
    }


def test_external_redis_replaces_the_charts_own() -> None:
    objs = objects("values-cpu.yaml", EXTERNAL)
    assert not [k for k in objs if "onerec-redis" in k]  # no StatefulSet, Secret, Services, policy
    for workload in ("Deployment/onerec-frontend", "Job/onerec-feature-load"):
        (c,) = objs[workload]["spec"]["template"]["spec"]["containers"]
        e = env(c)
        assert e["ONEREC_FEATURE_STORE"] == {"value": "rediss://redis.example.com:6380/1"}
        ref = e["ONEREC_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "ext-redis", "key": "secret"}
    # A Redis without auth: no password variable at all.
    no_auth = check.merge(EXTERNAL, {"externalRedis": {"existingSecret": ""}})
    fe = container(objects("values-cpu.yaml", no_auth)["Deployment/onerec-frontend"], "frontend")
    assert "ONEREC_REDIS_PASSWORD" not in env(fe)


def test_in_chart_redis_with_an_existing_secret() -> None:
    objs = objects(
        "values-cpu.yaml", {"redis": {"auth": {"existingSecret": "mine", "passwordKey": "pw"}}}
    )
    assert "Secret/onerec-redis" not in objs
    want = {"valueFrom": {"secretKeyRef": {"name": "mine", "key": "pw"}}}
    assert env(container(objs["StatefulSet/onerec-redis"], "redis"))["REDIS_PASSWORD"] == want
    fe = container(objs["Deployment/onerec-frontend"], "frontend")
    assert env(fe)["ONEREC_REDIS_PASSWORD"] == want


@pytest.mark.parametrize("profile", check.PROFILES)
def test_feature_load_is_a_post_install_and_upgrade_hook(profile: str) -> None:
    objs = objects(profile)
    job = objs["Job/onerec-feature-load"]
    notes = job["metadata"]["annotations"]
    assert notes["helm.sh/hook"] == "post-install,post-upgrade"
    assert notes["helm.sh/hook-delete-policy"] == "before-hook-creation"
    assert 1 <= job["spec"]["backoffLimit"] <= 10
    assert job["spec"]["activeDeadlineSeconds"] > 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (load,) = pod["containers"]
    assert load["args"] == [
        "features",
        "load",
        "--artifacts",
        "/models/artifacts",
        "--repository",
        "/models/repository",
    ]
    # The front end's image, store, model source and security contexts.
    dep = objs["Deployment/onerec-frontend"]
    fe_pod = dep["spec"]["template"]["spec"]
    fe = container(dep, "frontend")
    assert load["image"] == fe["image"]
    for name in ("ONEREC_FEATURE_STORE", "ONEREC_REDIS_PASSWORD"):
        assert env(load)[name] == env(fe)[name]
    assert pod["initContainers"] == fe_pod["initContainers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"] == next(v for v in fe_pod["volumes"] if v["name"] == "models")
    assert "emptyDir" in volumes["tmp"]
    assert {m["name"]: m["mountPath"] for m in load["volumeMounts"]} == {
        "models": "/models",
        "tmp": "/tmp",
    }
    assert pod["securityContext"] == fe_pod["securityContext"]
    assert load["securityContext"] == fe["securityContext"]
    assert load["resources"]["requests"] and load["resources"]["limits"]
    assert "Job/onerec-feature-load" not in objects(profile, {"featureLoad": {"enabled": False}})


def test_feature_load_reads_a_pvc_model_source_in_place() -> None:
    objs = objects(
        "values-cpu.yaml", {"modelRepository": {"source": "pvc", "pvc": {"claimName": "m"}}}
    )
    pod = objs["Job/onerec-feature-load"]["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    (models,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert models["persistentVolumeClaim"] == {"claimName": "m", "readOnly": True}


def test_feature_load_args_are_a_cli_command() -> None:
    from onerec.cli import build_parser

    parser = build_parser()
    job = objects("values-cpu.yaml")["Job/onerec-feature-load"]
    args = parser.parse_args(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert str(args.artifacts) == "/models/artifacts"
    assert str(args.repository) == "/models/repository"
    # The store and its password come from the env; no --force, so a loaded store stays.
    assert args.func.__name__ == "cmd_features_load"
    assert args.feature_store is None and not args.force


def test_model_bundle_carries_the_data_set_the_loader_reads() -> None:
    dockerfile = (K8S / "Dockerfile.model").read_text()
    ignore = (K8S / "Dockerfile.model.dockerignore").read_text()
    assert re.search(r"^COPY \$\{ARTIFACTS\}/data /bundle/artifacts/data$", dockerfile, re.M)
    assert "!artifacts/*/data/" in ignore.splitlines()
    for text in (dockerfile, ignore, (K8S / "values.yaml").read_text()):
        assert "features.sqlite" not in text


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
    """Both images install pyproject's dependency list, which has no torch (only the
    `train` extra does): the request path is onerec.runtime, and each image checks at
    build time that importing it leaves torch unloaded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("torch") for d in project["dependencies"])
    assert any(d.startswith("torch==") for d in project["optional-dependencies"]["train"])
    protoc = "grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=."
    for name in ("Dockerfile.frontend", "Dockerfile.triton"):
        text = (K8S / name).read_text()
        assert "torch==" not in text and "TORCH_INDEX_URL" not in text, name
        assert "'torch' not in sys.modules" in text, f"{name} must check torch stays out"
        assert "['project']['dependencies']" in text, f"{name} must install pyproject's list"
        assert protoc in text and "protos/onerec/v1/recommender.proto" in text
        assert re.search(r"^USER 10001:10001$", text, re.M), f"{name} must run as uid 10001"
    assert "FROM python:${PYTHON_VERSION}" in (K8S / "Dockerfile.frontend").read_text()
    assert "ARG PYTHON_VERSION=3.11" in (K8S / "Dockerfile.frontend").read_text()
