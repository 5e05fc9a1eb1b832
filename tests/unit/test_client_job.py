"""The client's job builder mirrors the CRD and is checked against the CRD's schema before anything is sent."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from finetune_client import job as builder
from finetune_client.errors import InvalidJob
from finetune_client.job import Dataset, FineTuneJob, Lora, Model, Output, Training, camel_case
from finetune_client.schema import CRD_FILE, crd, spec_schema, validate_manifest

ROOT = Path(__file__).resolve().parents[2]


def make_job(**overrides: Any) -> FineTuneJob:
    fields: dict[str, Any] = {
        "name": "support-bot",
        "model": Model("s3://models/tiny-gpt2"),
        "dataset": Dataset("s3://datasets/support.jsonl", format="chat", eval_split=0.1),
        "output": Output("s3://finetune-output/support-bot"),
        "training": Training(max_steps=20, learning_rate=0.003),
    }
    return FineTuneJob(**{**fields, **overrides})


def test_the_packaged_crd_is_the_repositorys_one_file() -> None:
    packaged = ROOT / "client" / "finetune_client" / "crd" / CRD_FILE
    assert packaged.is_symlink() and packaged.resolve() == (ROOT / "crds" / CRD_FILE).resolve()
    assert crd()["spec"]["names"]["kind"] == "FineTuneJob"


# CRD sections that are core Kubernetes types, passed through ``extra_spec`` as the Kubernetes API spells them.
PASSED_THROUGH = {"affinity"}


def _section_classes() -> list[tuple[str, type[Any]]]:
    """(CRD path, builder class) of every builder section, found by walking the builder from FineTuneJob."""
    found: list[tuple[str, type[Any]]] = []

    def walk(path: str, cls: type[Any]) -> None:
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            for candidate in typing.get_args(hints[item.name]) or (hints[item.name],):
                if dataclasses.is_dataclass(candidate):
                    child = f"{path}.{camel_case(item.name)}".lstrip(".")
                    found.append((child, candidate))  # type: ignore[arg-type]
                    walk(child, candidate)  # type: ignore[arg-type]

    walk("", FineTuneJob)
    return found


def _crd_node(path: str) -> dict[str, Any]:
    node = spec_schema()
    for part in path.split("."):
        node = node["properties"][part]
    return node


@pytest.mark.parametrize(("path", "section"), _section_classes(), ids=[p for p, _ in _section_classes()])
def test_every_builder_section_has_exactly_the_crds_fields(path: str, section: type[Any]) -> None:
    names = {camel_case(f.name) for f in dataclasses.fields(section)}
    assert names == set(_crd_node(path)["properties"])


def test_every_crd_section_has_a_builder_section() -> None:
    def sections(node: dict[str, Any], path: str) -> list[str]:
        found = []
        for name, child in node.get("properties", {}).items():
            if child.get("type") == "object" and child.get("properties"):
                found += [f"{path}{name}", *sections(child, f"{path}{name}.")]
        return found

    crd_sections = {s for s in sections(spec_schema(), "") if s.split(".")[0] not in PASSED_THROUGH}
    assert crd_sections == {path for path, _ in _section_classes()}


def test_top_level_builder_fields_are_spec_fields() -> None:
    assert {camel_case(name) for name in FineTuneJob.SECTIONS} <= set(spec_schema()["properties"])


def test_manifest_uses_the_crds_names_and_leaves_unset_fields_out() -> None:
    job = make_job(training=Training(method="lora", lora=Lora(r=8, alpha=16), max_steps=20),
                   extra_spec={"tolerations": [{"key": "gpu", "operator": "Exists"}]})
    manifest = job.to_manifest()
    assert manifest["apiVersion"] == "finetune.dev/v1alpha1" and manifest["kind"] == "FineTuneJob"
    assert manifest["spec"]["training"] == {"method": "lora", "lora": {"r": 8, "alpha": 16}, "maxSteps": 20}
    assert manifest["spec"]["dataset"] == {"uri": "s3://datasets/support.jsonl", "format": "chat", "evalSplit": 0.1}
    assert manifest["spec"]["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    job.validate()


def test_evaluation_gang_and_queue_fields_take_the_crds_names() -> None:
    job = make_job(
        evaluation=builder.Evaluation(prompts=["How do I reset my password?"], max_new_tokens=32),
        gang=builder.Gang(scheduler="volcano", min_member=1),
        topology=builder.Topology(required="topology.kubernetes.io/zone"),
        training=Training(max_steps=20, early_stopping=builder.EarlyStopping(patience=3)),
        queue_name="team-a",
        tracking=builder.Tracking(builder.Mlflow("http://mlflow:5000", "support", register_model_as="support-bot")),
    )
    spec = job.to_manifest()["spec"]
    assert spec["tracking"] == {"mlflow": {"trackingUri": "http://mlflow:5000", "experiment": "support",
                                           "registerModelAs": "support-bot"}}
    assert spec["evaluation"] == {"prompts": ["How do I reset my password?"], "maxNewTokens": 32}
    assert spec["gang"] == {"scheduler": "volcano", "minMember": 1}
    assert spec["topology"] == {"required": "topology.kubernetes.io/zone"}
    assert spec["training"]["earlyStopping"] == {"patience": 3}
    assert spec["queueName"] == "team-a"
    job.validate()


@pytest.mark.parametrize(
    ("job", "message"),
    [
        pytest.param(make_job(training=Training(max_steps=20, learning_rate=0)), "spec.training.learningRate",
                     id="learning rate 0"),
        pytest.param(make_job(dataset=Dataset("s3://datasets/x.jsonl", format="csv")), "spec.dataset.format",
                     id="unknown format"),
        pytest.param(make_job(model=Model("https://huggingface.co/gpt2")), "spec.model.uri", id="not an S3 URI"),
        pytest.param(make_job(extra_spec={"trainng": {}}), "spec: Additional properties", id="misspelt section"),
        pytest.param(make_job(name="Support_Bot"), "metadata.name", id="bad name"),
        pytest.param(make_job(evaluation=builder.Evaluation(prompts=["Hi"], max_new_tokens=0)),
                     "spec.evaluation.maxNewTokens", id="maxNewTokens 0"),
        pytest.param(make_job(gang=builder.Gang(scheduler="yunikorn")), "spec.gang.scheduler",
                     id="unknown gang scheduler"),
    ],
)
def test_a_job_the_crd_rejects_fails_locally_naming_the_field(job: FineTuneJob, message: str) -> None:
    with pytest.raises(InvalidJob, match=message.replace(".", r"\.")) as raised:
        job.validate()
    assert "\n" not in str(raised.value)


def test_a_manifest_of_another_kind_is_refused() -> None:
    with pytest.raises(InvalidJob, match="not a FineTuneJob"):
        validate_manifest({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {}})


def test_the_client_and_the_command_import_neither_torch_nor_transformers() -> None:
    code = ("import sys, finetune_client, finetune_client.cli, finetune_client.cli_run; "
            "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_passes_the_local_check(example: Path) -> None:
    import yaml

    # examples/kueue.yaml also holds the Kueue objects the job waits in.
    jobs = [doc for doc in yaml.safe_load_all(example.read_text()) if doc["kind"] == "FineTuneJob"]
    assert len(jobs) == 1
    validate_manifest(jobs[0])
