"""The Helm chart's monitoring: scrape configs, alerts that fire only when they should (promtool), the dashboard."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from chart_render import (
    CHART,
    FULLNAME,
    NAMESPACE,
    OPERATOR_METRICS,
    SCENARIOS,
    TRAINER_METRICS,
    of_kind,
    one,
    render,
)


def _metric_names(expression: str) -> set[str]:
    names = set(re.findall(r"\b(finetune_\w+|DCGM_\w+)", expression))
    return {re.sub(r"_(bucket|sum|count)$", "", name) if name.startswith("finetune_operator_reconcile") else name
            for name in names}


def test_should_render_no_monitoring_objects_by_default(helm_bin: Path) -> None:
    kinds = {doc["kind"] for doc in render(helm_bin)}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def test_should_scrape_operator_and_trainers_when_monitoring_is_on(helm_bin: Path) -> None:
    docs = render(helm_bin, *SCENARIOS["monitoring on"], "--set", "metrics.serviceMonitor.labels.release=kps")
    service = one(docs, "Service")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    # The ServiceMonitor selects the metrics Service and scrapes its named port.
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    # The Service reaches the operator pods' metrics port.
    assert service["spec"]["selector"].items() <= one(docs, "Deployment")["spec"]["template"]["metadata"][
        "labels"].items()

    pod_monitor = one(docs, "PodMonitor")
    assert pod_monitor["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/name": "finetune-trainer"}}
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["honorLabels"] is True  # the trainer's job/namespace labels name the FineTuneJob
    sources = {tuple(r["sourceLabels"]) for r in endpoint["relabelings"]}
    assert ("__meta_kubernetes_pod_annotation_prometheus_io_scrape",) in sources
    assert ("__meta_kubernetes_pod_ip", "__meta_kubernetes_pod_annotation_prometheus_io_port") in sources
    assert ("__meta_kubernetes_pod_annotation_prometheus_io_path",) in sources
    # The FineTuneJob's name and namespace come from the pod itself, whatever labels the trainer exports.
    targets = {r.get("targetLabel"): r["sourceLabels"] for r in endpoint["relabelings"] if r.get("targetLabel")}
    assert targets["job_name"] == ["__meta_kubernetes_pod_label_finetune_dev_job_name"]
    assert targets["job_namespace"] == ["__meta_kubernetes_namespace"]
    assert targets["attempt"] == ["__meta_kubernetes_pod_label_finetune_dev_attempt"]
    assert targets["node_rank"] == ["__meta_kubernetes_pod_label_finetune_dev_node_rank"]


def test_should_scrape_only_watched_namespaces_when_they_are_listed(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set", "podMonitor.enabled=true", "--set", "watchNamespaces={team-a,team-b}")
    assert one(docs, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_should_alert_on_failed_stalled_restarting_and_waiting_jobs_when_rules_are_on(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set", "prometheusRule.enabled=true", "--set", "prometheusRule.progressStalledMinutes=45",
                  "--set", "prometheusRule.restartStormCount=5", "--set", "prometheusRule.capacityWaitMinutes=90",
                  "--set", "prometheusRule.alertLabels.team=ml")
    rules = {rule["alert"]: rule for group in one(docs, "PrometheusRule")["spec"]["groups"] for rule in group["rules"]}
    assert set(rules) == {"FineTuneJobFailed", "FineTuneJobProgressStalled", "FineTuneJobRestartStorm",
                          "FineTuneJobWaitingForCapacity"}
    assert "finetune_operator_jobs_failed_total" in rules["FineTuneJobFailed"]["expr"]
    stalled = rules["FineTuneJobProgressStalled"]["expr"]
    assert "changes(finetune_step[45m])" in stalled and "finetune_total_steps" in stalled
    assert "offset 45m" in stalled and "by (job_namespace, job_name)" in stalled
    assert "finetune_operator_jobs_restarted_total" in rules["FineTuneJobRestartStorm"]["expr"]
    assert rules["FineTuneJobRestartStorm"]["expr"].endswith("> 5")
    waiting = rules["FineTuneJobWaitingForCapacity"]
    assert 'finetune_operator_jobs{phase="Pending"}' in waiting["expr"] and waiting["for"] == "90m"
    for name, rule in rules.items():
        assert _metric_names(rule["expr"]) <= TRAINER_METRICS | OPERATOR_METRICS, name
        assert "kube_customresource" not in rule["expr"]
        assert rule["expr"].count("(") == rule["expr"].count(")"), name
        assert rule["labels"]["severity"] and rule["labels"]["team"] == "ml"
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        # Prometheus templating survives Helm's: the annotations still hold {{ ... }} for Alertmanager.
    assert "{{ $labels.job_name }}" in rules["FineTuneJobProgressStalled"]["annotations"]["summary"]


needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (make tools installs Debian's prometheus)")


def _alerting_rules_file(helm: Path, tmp_path: Path, *args: str) -> Path:
    """The chart's rules as a plain Prometheus rules file, without annotations (promtool compares those exactly)."""
    rule = one(render(helm, "--set", "prometheusRule.enabled=true", *args), "PrometheusRule")
    groups = copy.deepcopy(rule["spec"]["groups"])
    for group in groups:
        for alert in group["rules"]:
            alert.pop("annotations", None)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


@needs_promtool
def test_alerts_should_fire_only_on_failed_stalled_storming_and_waiting_jobs(helm_bin: Path, tmp_path: Path) -> None:
    """promtool evaluates the rendered rules on synthetic series: each alert fires when it should, and only then."""
    rules = _alerting_rules_file(helm_bin, tmp_path)
    assert _promtool("check", "rules", str(rules)).returncode == 0
    job = 'job_name="llama", job_namespace="team-a"'
    stalled_labels = {"severity": "warning", "job_name": "llama", "job_namespace": "team-a"}
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {   # A stuck job (step 40 of 100 for 90 minutes) next to a moving one and a finished one.
                "interval": "1m",
                "input_series": [
                    {"series": f'finetune_step{{{job}, rank="0"}}', "values": "40x90"},
                    {"series": f'finetune_total_steps{{{job}, rank="0"}}', "values": "100x90"},
                    {"series": 'finetune_step{job_name="moving", job_namespace="team-a", rank="0"}',
                     "values": "0+1x90"},
                    {"series": 'finetune_total_steps{job_name="moving", job_namespace="team-a", rank="0"}',
                     "values": "1000x90"},
                    {"series": 'finetune_step{job_name="done", job_namespace="team-a", rank="0"}', "values": "100x90"},
                    {"series": 'finetune_total_steps{job_name="done", job_namespace="team-a", rank="0"}',
                     "values": "100x90"},
                ],
                "alert_rule_test": [
                    {"eval_time": "20m", "alertname": "FineTuneJobProgressStalled", "exp_alerts": []},
                    {"eval_time": "45m", "alertname": "FineTuneJobProgressStalled",
                     "exp_alerts": [{"exp_labels": stalled_labels}]},
                ],
            },
            {   # Preemptions and crashes add up to a storm; a quiet operator raises nothing.
                "interval": "1m",
                "input_series": [
                    {"series": 'finetune_operator_jobs_restarted_total{reason="Preempted"}', "values": "0 0 1 1 2 2 2"},
                    {"series": 'finetune_operator_jobs_restarted_total{reason="Failed"}', "values": "0 1 1 2 2 2 2"},
                    {"series": 'finetune_operator_jobs_failed_total{reason="BackoffLimitExceeded"}',
                     "values": "0 0 0 1 1 1 1"},
                ],
                "alert_rule_test": [
                    {"eval_time": "1m", "alertname": "FineTuneJobRestartStorm", "exp_alerts": []},
                    {"eval_time": "6m", "alertname": "FineTuneJobRestartStorm",
                     "exp_alerts": [{"exp_labels": {"severity": "warning"}}]},
                    {"eval_time": "2m", "alertname": "FineTuneJobFailed", "exp_alerts": []},
                    {"eval_time": "6m", "alertname": "FineTuneJobFailed",
                     "exp_alerts": [{"exp_labels": {"severity": "warning", "reason": "BackoffLimitExceeded"}}]},
                ],
            },
            {   # Pending for longer than capacityWaitMinutes (60).
                "interval": "1m",
                "input_series": [
                    {"series": 'finetune_operator_jobs{phase="Pending", namespace="finetune-system"}',
                     "values": "2x90"},
                    {"series": 'finetune_operator_jobs{phase="Running", namespace="finetune-system"}',
                     "values": "5x90"},
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "FineTuneJobWaitingForCapacity", "exp_alerts": []},
                    {"eval_time": "70m", "alertname": "FineTuneJobWaitingForCapacity",
                     "exp_alerts": [{"exp_labels": {"severity": "info", "namespace": "finetune-system"}}]},
                ],
            },
        ],
    }
    test_file = tmp_path / "alerts-test.yaml"
    test_file.write_text(yaml.safe_dump(tests))
    proc = _promtool("test", "rules", str(test_file))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_dashboard_queries_should_be_valid_promql(helm_bin: Path, tmp_path: Path) -> None:
    dashboard = json.loads((CHART / "files" / "finetunejob-dashboard.json").read_text())
    grafana_variables = {"$__rate_interval": "5m", "$namespace": "team-a", "$job": "llama"}
    rules = []
    for index, target in enumerate(t for panel in dashboard["panels"] for t in panel.get("targets", [])):
        expression = target["expr"]
        for variable, value in grafana_variables.items():
            expression = expression.replace(variable, value)
        assert "$" not in expression, target["expr"]
        rules.append({"record": f"dashboard:query_{index}", "expr": expression})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = _promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_should_ship_a_grafana_dashboard_using_the_trainer_operator_and_dcgm_metrics(helm_bin: Path) -> None:
    docs = render(helm_bin)
    config_map = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (body,) = config_map["data"].values()
    dashboard = json.loads(body)
    assert dashboard["uid"] and dashboard["title"] == "FineTuneJob"
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used: set[str] = set()
    for expression in expressions:
        used |= _metric_names(expression)
    assert used >= {"finetune_train_loss", "finetune_eval_loss", "finetune_tokens_per_second", "finetune_step",
                    "finetune_total_steps", "finetune_operator_jobs_restarted_total", "DCGM_FI_DEV_GPU_UTIL"}
    assert used <= TRAINER_METRICS | OPERATOR_METRICS | {"DCGM_FI_DEV_GPU_UTIL"}, "unknown metric name"
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Training loss", "Eval loss", "Tokens per second", "Progress", "Restarts", "GPU utilisation"} <= titles
    # Panels are filtered by the job picked in the dashboard's variables.
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace", "job"}
    trainer_expressions = [e for e in expressions if _metric_names(e) & TRAINER_METRICS]
    assert trainer_expressions and all('job_name="$job"' in e for e in trainer_expressions)
    # The same bytes as the chart's file: the ConfigMap is not re-templated.
    assert json.loads((CHART / "files" / "finetunejob-dashboard.json").read_text()) == dashboard


def test_should_put_the_dashboard_where_grafana_looks_when_a_namespace_is_set(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set", "grafanaDashboard.namespace=monitoring")
    assert one(docs, "ConfigMap")["metadata"]["namespace"] == "monitoring"
    assert not of_kind(render(helm_bin, "--set", "grafanaDashboard.enabled=false"), "ConfigMap")

