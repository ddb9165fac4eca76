"""Offline check of the Helm chart in k8s/ (`make k8s-check`): no cluster, no network.

For each profile (values-cpu.yaml, values-gpu.yaml) and any extra overrides:
1. lint the chart with Helm's own linter (strict: warnings fail);
2. render it with Helm's Go SDK through the PyPI package helm-python-sdk (no helm binary),
   which also checks the values against values.schema.json;
3. validate every rendered object with kubernetes-validate against the Kubernetes 1.31
   OpenAPI schemas in strict mode (unknown fields fail). Custom resources it has no schema
   for are skipped only when their kind is listed in SKIPPED_KINDS; any other missing
   schema is an error.

    python k8s/check.py                       # both profiles
    python k8s/check.py -f my-values.yaml     # each profile plus your overrides
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parent
PROFILES = ("values-cpu.yaml", "values-gpu.yaml")
KUBE_VERSION = "1.31.0"
RELEASE = "onerec"
NAMESPACE = "onerec"
# (apiVersion, kind) of custom resources the chart may render; Kubernetes has no schema
# for them (they need their operator's CRD in the cluster).
SKIPPED_KINDS = frozenset({("monitoring.coreos.com/v1", "ServiceMonitor")})


@dataclass
class Report:
    """What one profile rendered to, and everything wrong with it."""

    profile: str
    objects: list[dict[str, Any]] = field(default_factory=list)
    validated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``, as Helm layers -f files."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def profile_values(profile: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    values = yaml.safe_load((CHART / profile).read_text()) or {}
    return merge(values, overrides or {})


def _name(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def lint(values: dict[str, Any]) -> list[str]:
    """Helm's linter in strict mode; info messages (e.g. 'icon is recommended') pass."""
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    return [
        f"lint {m['path']}: {m['error'].strip()}" for m in report["messages"] if m["severity"] >= 2
    ]


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart renders with ``values`` (NOTES.txt and empty documents dropped)."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def validate(obj: dict[str, Any]) -> str | None:
    """None if ``obj`` is a valid Kubernetes 1.31 object (strict), else why not."""
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path) or "(root)"
        return f"{_name(obj)}: {where}: {e.message}"
    except kubernetes_validate.SchemaNotFoundError as e:
        return f"{_name(obj)}: {e.message} (add it to SKIPPED_KINDS only if it is a CRD)"
    return None


def check(profile: str, overrides: dict[str, Any] | None = None) -> Report:
    report = Report(profile)
    values = profile_values(profile, overrides)
    report.errors += lint(values)
    try:
        report.objects = render(values)
    except helm.HelmError as e:
        report.errors.append(f"render: {str(e).strip()}")
        return report
    for obj in report.objects:
        if (obj.get("apiVersion"), obj.get("kind")) in SKIPPED_KINDS:
            report.skipped.append(_name(obj))
        elif (error := validate(obj)) is not None:
            report.errors.append(error)
        else:
            report.validated.append(_name(obj))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-f", "--values", action="append", default=[], help="extra values file")
    parser.add_argument("--profile", action="append", choices=PROFILES, help="default: all")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    for path in args.values:
        overrides = merge(overrides, yaml.safe_load(Path(path).read_text()) or {})
    print(
        f"chart {CHART.name}: helm lint --strict, render (Helm SDK {helm.helm_sdk_version()} "
        f"via helm-python-sdk, values.schema.json), validate against Kubernetes {KUBE_VERSION} "
        f"strict (kubernetes-validate {kubernetes_validate.__version__})"
    )
    failed = 0
    for profile in args.profile or PROFILES:
        report = check(profile, overrides)
        status = "ok" if report.ok else "FAILED"
        print(
            f"{profile}: {status}: {len(report.validated)} objects valid, "
            f"{len(report.skipped)} skipped as CRDs, {len(report.errors)} errors"
        )
        for name in report.validated:
            print(f"  valid    {name}")
        for name in report.skipped:
            print(f"  skipped  {name} (CRD)")
        for error in report.errors:
            print(f"  ERROR    {error}")
        failed += not report.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
