"""The Argo CD health check deploy/argocd/finetunejob-health.lua, run in real Lua on sample FineTuneJobs."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (ROOT / "deploy" / "argocd" / "finetunejob-health.lua").read_text()
KEY = "resource.customizations.health.finetune.dev_FineTuneJob"
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def _to_lua(lua: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


def health(obj: dict[str, Any], dialect: str = "lua51") -> tuple[str, str]:
    """Runs the script the way Argo CD does: `obj` is a global table, the chunk returns hs."""
    lupa = importlib.import_module(f"lupa.{dialect}")
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = _to_lua(lua, obj)
    hs = lua.execute(SCRIPT)
    return hs["status"], hs["message"]


def job(status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "llama-7b-support", "namespace": "ml", "generation": generation},
        "spec": {"model": {"uri": "s3://models/llama"}},
    }
    if status is not None:
        obj["status"] = status
    return obj


def condition(kind: str, message: str, status: str = "True") -> dict[str, str]:
    return {"type": kind, "status": status, "reason": kind, "message": message}


RUNNING = {
    "phase": "Running",
    "observedGeneration": 1,
    "progress": {"step": 120, "totalSteps": 1000, "percent": 12.0, "summary": "120/1000 (12%)", "eta": "1h02m"},
    "metrics": {"loss": 1.23456, "evalLoss": 1.5, "tokensPerSecond": 5000.0, "learningRate": 0.0002},
}


@pytest.mark.parametrize("dialect", ["lua51", "lua54"])  # gopher-lua (Argo CD) speaks 5.1; stay portable
@pytest.mark.parametrize(
    ("status", "expected_health", "message_parts"),
    [
        (None, "Progressing", ["Waiting for the operator"]),
        ({}, "Progressing", ["Waiting for the operator"]),
        ({"phase": "Pending"}, "Progressing", ["Pending"]),
        (
            {"phase": "Pending", "message": "pods created",
             "conditions": [
                 condition("WaitingForCapacity", "0/12 nodes are available: 12 Insufficient nvidia.com/gpu")]},
            "Progressing",
            ["Pending: 0/12 nodes are available: 12 Insufficient nvidia.com/gpu"],
        ),
        (
            {"phase": "Pending", "message": "pods created",
             "conditions": [condition("WaitingForCapacity", "old news", status="False")]},
            "Progressing",
            ["Pending: pods created"],
        ),
        (RUNNING, "Progressing", ["Running: step 120/1000 (12%)", "loss 1.235", "ETA 1h02m"]),
        (
            {"phase": "Running", "progress": {"step": 7, "totalSteps": 60}},
            "Progressing",
            ["Running: step 7/60"],
        ),
        ({"phase": "Running", "message": "all 2 pods running"}, "Progressing", ["Running: all 2 pods running"]),
        (
            {"phase": "Restarting", "restarts": 2, "message": "pod llama-7b-support-a1-n1 exited with code 1"},
            "Progressing",
            ["Restarting: restart 2: pod llama-7b-support-a1-n1 exited with code 1"],
        ),
        ({"phase": "Suspended", "message": "spec.suspend is true"}, "Suspended", ["Suspended: spec.suspend is true"]),
        (
            {"phase": "Queued", "message": "Queued: waiting",
             "conditions": [condition("Queued", "couldn't assign flavors to pod set trainer: insufficient quota "
                                                "for nvidia.com/gpu in flavor a100, 16 more needed")]},
            "Suspended",
            ["Queued: couldn't assign flavors to pod set trainer: insufficient quota for nvidia.com/gpu"],
        ),
        ({"phase": "Queued", "message": "Queued: waiting"}, "Suspended", ["Queued: Queued: waiting"]),
        (
            {"phase": "Succeeded", "model": {"uri": "s3://ml-finetunes/llama-7b-support/model/", "export": "merged"}},
            "Healthy",
            ["Succeeded: model at s3://ml-finetunes/llama-7b-support/model/"],
        ),
        ({"phase": "Succeeded", "message": "done"}, "Healthy", ["Succeeded: done"]),
        (
            {"phase": "Failed", "message": "backoffLimit 3 reached: pod exited with code 1",
             "conditions": [condition("Failed", "ignored: status.message wins")]},
            "Degraded",
            ["Failed: backoffLimit 3 reached: pod exited with code 1"],
        ),
        (
            {"phase": "Failed", "conditions": [condition("InvalidSpec", "spec.training.lora.r: must be at least 1")]},
            "Degraded",
            ["Failed: spec.training.lora.r: must be at least 1"],
        ),
        ({"phase": "Failed"}, "Degraded", ["Failed"]),
        ({"phase": "Exploded"}, "Unknown", ["Exploded"]),
    ],
)
def test_should_map_each_phase_to_argo_health_with_its_message(
    dialect: str, status: dict[str, Any] | None, expected_health: str, message_parts: list[str]
) -> None:
    got_health, message = health(job(status), dialect)
    assert got_health == expected_health
    for part in message_parts:
        assert part in message


def test_should_report_progressing_when_the_operator_has_not_seen_the_latest_spec() -> None:
    assert health(job({**RUNNING, "observedGeneration": 1}, generation=2)) == (
        "Progressing", "Waiting for the operator to observe spec generation 2")
    # A finished job stays finished whatever its spec says now.
    assert health(job({"phase": "Failed", "message": "boom", "observedGeneration": 1}, generation=2)) == (
        "Degraded", "Failed: boom")


def test_should_give_a_known_non_unknown_health_for_every_phase_in_the_crd() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "finetune.dev_finetunejobs.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    phases = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["phase"]["enum"]
    assert set(phases) >= {"Pending", "Running", "Restarting", "Suspended", "Queued", "Succeeded", "Failed"}
    for phase in phases:
        got_health, message = health(job({"phase": phase}))
        assert got_health in ARGO_STATUSES - {"Unknown", "Missing"}, phase
        assert message


def test_docs_should_install_this_very_script_under_the_argocd_cm_key() -> None:
    text = (ROOT / "docs" / "gitops.md").read_text()
    assert "deploy/argocd/finetunejob-health.lua" in text
    blocks = re.findall(r"^```yaml\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    scripts = [
        doc["data"][KEY]
        for block in blocks for doc in yaml.safe_load_all(block)
        if doc and doc.get("kind") == "ConfigMap" and KEY in doc.get("data", {})
    ]
    assert scripts == [SCRIPT], "the argocd-cm in docs/gitops.md differs from deploy/argocd/finetunejob-health.lua"
