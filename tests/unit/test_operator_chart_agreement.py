"""Names the operator and the Helm chart must agree on: metrics the chart queries, the default trainer image, the
pod labels and annotations the PodMonitor relabels, the ports its NetworkPolicy opens."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from operator_factories import make_job
from prometheus_client import CollectorRegistry

from finetune_operator import constants as c
from finetune_operator.builders import build_worker_pod
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.settings import Settings
from finetune_operator.spec import parse_job

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "finetune-operator"
# Series suffixes Prometheus sees for each metric type (prometheus_client's exposition).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("", "_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported_series(registry: CollectorRegistry) -> set[str]:
    """Every series name a scrape of the registry can show, labelled children or not yet observed included."""
    return {family.name + suffix for family in registry.collect() for suffix in SUFFIXES.get(family.type, ("",))}


def chart_operator_series() -> dict[str, set[str]]:
    """finetune_operator_* names in the dashboard and the PrometheusRule, by file."""
    files = [CHART / "files" / "finetunejob-dashboard.json", CHART / "templates" / "prometheusrule.yaml"]
    return {path.name: set(re.findall(r"\bfinetune_operator_[a-z0-9_]+", path.read_text())) for path in files}


def test_every_operator_metric_the_dashboard_and_alerts_query_is_exported() -> None:
    exported = exported_series(OperatorMetrics().registry)
    used = chart_operator_series()
    assert used["finetunejob-dashboard.json"] and used["prometheusrule.yaml"]
    for name, series in used.items():
        assert series <= exported, f"{name} queries what the operator does not export: {sorted(series - exported)}"
    # The dashboard's reconcile latency panel: the operator's histogram under the chart's name.
    assert "finetune_operator_reconcile_seconds_bucket" in used["finetunejob-dashboard.json"]


def test_the_operators_default_trainer_image_is_the_charts() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    image = values["trainer"]["image"]
    assert not image["digest"]
    chart_default = f"{image['repository']}:{image['tag'] or chart['appVersion']}"
    assert Settings().trainer_image == c.DEFAULT_TRAINER_IMAGE == chart_default


def _pod() -> dict[str, object]:
    body = make_job()
    body["status"] = {"attempt": 0}
    return build_worker_pod(parse_job(body), 0, "img")


def _prometheus_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def test_the_pod_monitor_relabels_labels_and_annotations_trainer_pods_carry() -> None:
    pod = _pod()
    metadata = pod["metadata"]
    assert isinstance(metadata, dict)
    labels = {_prometheus_name(k) for k in metadata["labels"]}
    annotations = {_prometheus_name(k) for k in metadata["annotations"]}
    text = (CHART / "templates" / "podmonitor.yaml").read_text()
    used_labels = set(re.findall(r"__meta_kubernetes_pod_label_(\w+)", text))
    used_annotations = set(re.findall(r"__meta_kubernetes_pod_annotation_(\w+)", text))
    assert used_labels and used_labels <= labels
    assert used_annotations and used_annotations <= annotations


def test_the_charts_trainer_selector_matches_the_trainer_pods() -> None:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    block = re.search(r'define "finetune-operator.trainerSelectorLabels" -}}\n(.*?)\n{{- end', helpers, re.DOTALL)
    assert block is not None
    selector = yaml.safe_load(block.group(1))
    metadata = _pod()["metadata"]
    assert isinstance(metadata, dict)
    assert selector == {c.LABEL_APP_NAME: c.APP_NAME}
    assert selector.items() <= metadata["labels"].items()


def test_the_network_policy_ports_are_the_crd_defaults() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    crd = yaml.safe_load((ROOT / "crds" / "finetune.dev_finetunejobs.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert values["trainer"]["metricsPort"] == spec["metrics"]["properties"]["port"]["default"]
    assert values["trainer"]["rendezvousPort"] == spec["distributed"]["properties"]["masterPort"]["default"]
    assert values["metrics"]["port"] == c.DEFAULT_METRICS_PORT
    assert values["operator"]["healthPort"] == c.DEFAULT_HEALTH_PORT
    assert values["operator"]["resyncSeconds"] == c.DEFAULT_RESYNC_SECONDS
