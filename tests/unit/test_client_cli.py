"""The ftj command without a cluster: parsing, the job built from a file and flags, data checks, one-line errors."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from finetune_client import cli, cli_run, datasets, plot
from finetune_client.errors import DataRejected, InvalidJob

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny-cpu.yaml"
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def run_args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["run", *argv])


def test_flags_override_the_file_and_the_output_follows_the_new_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli_run.OUTPUT_PREFIX_ENV, raising=False)
    manifest = cli_run.manifest_from_arguments(
        run_args("my-chat", "-f", str(EXAMPLE), "--max-steps", "30", "--lora", "--lora-r", "4", "--nodes", "2",
                 "--set", "training.warmupRatio=0.2", "--set", "spec.checkpoint.keep=1")
    )
    spec = manifest["spec"]
    assert manifest["metadata"]["name"] == "my-chat"
    assert spec["output"]["uri"] == "s3://finetune-output/my-chat"
    assert spec["training"]["maxSteps"] == 30 and spec["training"]["method"] == "lora"
    assert spec["training"]["lora"] == {"r": 4}
    assert spec["training"]["warmupRatio"] == 0.2 and spec["checkpoint"]["keep"] == 1
    assert spec["distributed"]["nodes"] == 2 and spec["distributed"]["procsPerNode"] == 1
    assert spec["storage"]["credentialsSecret"] == "s3-credentials"


def test_a_job_by_flags_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli_run.OUTPUT_PREFIX_ENV, "s3://finetune-output")
    manifest = cli_run.manifest_from_arguments(run_args(
        "flags", "--model", "s3://models/tiny", "--data", "s3://datasets/a.jsonl", "--epochs", "1",
        "--credentials-secret", "s3-credentials", "--force-path-style"))
    assert manifest["spec"] == {
        "training": {"epochs": 1.0},
        "storage": {"credentialsSecret": "s3-credentials", "forcePathStyle": True},
        "dataset": {"format": "chat", "uri": "s3://datasets/a.jsonl"},
        "output": {"uri": "s3://finetune-output/flags"},
        "model": {"uri": "s3://models/tiny"},
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("spec: [unclosed\n", r"job\.yaml:2: not valid YAML", id="malformed YAML"),
        pytest.param("- a\n- b\n", "expected one FineTuneJob object", id="a list"),
    ],
)
def test_bad_yaml_is_one_line_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(InvalidJob, match=message) as raised:
        cli_run.load_manifest_file(path)
    assert "\n" not in str(raised.value)


def test_a_malformed_row_is_named_by_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    path.write_text("\n".join(json.dumps(r) for r in (CHAT, CHAT, bad)) + "\n")
    with pytest.raises(DataRejected, match=rf"{path}:3: no assistant turn"):
        datasets.check_file(path, "chat")


def test_rows_in_memory_are_checked_and_written_as_json_lines() -> None:
    import pandas as pd

    assert datasets.rows_to_jsonl([CHAT], "chat").decode().splitlines() == [json.dumps(CHAT)]
    frame = pd.DataFrame([{"prompt": "2+2?", "completion": "4"}])
    assert json.loads(datasets.rows_to_jsonl(frame, "promptCompletion")) == {"prompt": "2+2?", "completion": "4"}
    with pytest.raises(DataRejected, match=r"rows\[1\]: missing field 'completion'"):
        datasets.rows_to_jsonl([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "promptCompletion")


def ftj(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "finetune_client", *argv], capture_output=True, text=True,
                          timeout=60, env=env)


def unreachable_kubeconfig(tmp_path: Path) -> Path:
    """A kubeconfig whose API server address nobody listens on."""
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "nowhere",
        "clusters": [{"name": "nowhere", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "me", "user": {"token": "x"}}],
        "contexts": [{"name": "nowhere", "context": {"cluster": "nowhere", "user": "me"}}],
    }))
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["bogus"], "invalid choice: 'bogus'", id="unknown command"),
        pytest.param(["logs"], "the following arguments are required: name", id="missing name"),
        pytest.param(["ls"], "cannot reach the Kubernetes API at https://127.0.0.1:1", id="no reachable cluster"),
    ],
)
def test_errors_are_one_line_and_exit_2(tmp_path: Path, argv: list[str], message: str) -> None:
    result = ftj("--kubeconfig", str(unreachable_kubeconfig(tmp_path)), *argv)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_the_view_shows_phase_progress_losses_rate_eta_restarts_and_event() -> None:
    from finetune_client.job_view import Job
    from finetune_client.live_view import Series, render, sparkline

    series = Series()
    job: dict[str, Any] = {"metadata": {"name": "bot"}, "status": {"phase": "Running", "attempt": 1, "restarts": 1}}
    for step, loss in ((10, 3.0), (20, 2.0), (30, 1.0)):
        job["status"]["progress"] = {"step": step, "totalSteps": 40, "percent": step * 2.5, "etaSeconds": 75}
        job["status"]["metrics"] = {"loss": loss, "evalLoss": 2.5, "tokensPerSecond": 812.4}
        series.observe(Job(job))
    lines = render(Job(job), series, {"type": "Normal", "reason": "Started", "message": "attempt 1"}, width=20)
    assert lines[0] == "bot  Running  attempt 1, 1 restart"
    assert lines[1] == "[###############.....]  30/40   75.0%  ETA 1m15s"
    assert lines[2] == "loss      1.0000  █▅▁" and series.eval_loss == [2.5]
    assert lines[4] == "tokens/s  812" and lines[5] == "event     Normal Started: attempt 1"
    assert sparkline([]) == "" and sparkline([1.0, 1.0]) == "▁▁"


def test_terminal_plot_puts_both_series_on_labelled_axes() -> None:
    history = [{"step": 0, "evalLoss": 4.0}, {"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0},
               {"step": 20, "evalLoss": 2.5}]
    drawn = plot.terminal_plot(history, width=21, height=5).splitlines()
    assert drawn[0].startswith("4.000 |o") and drawn[4].startswith("2.000 |") and drawn[4].endswith("*")
    assert "* train loss" in drawn[-1]
    assert plot.terminal_plot([]) == "no losses logged yet"


class AdapterJobClient:
    """Just what ``ftj pull`` reads of a client: a job whose base model is a local folder, and its adapter export."""

    def __init__(self, base: Path, adapter: Path) -> None:
        self.base, self.adapter = base, adapter

    def get(self, name: str) -> Any:
        return SimpleNamespace(spec={"model": {"uri": f"file://{self.base}"}})

    def download_model(self, name: str, dest: Path) -> Path:
        shutil.copytree(self.adapter, dest)
        return dest


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_pull_merges_an_adapter_into_its_base_unless_told_not_to(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_client.cli import command_pull
    from finetune_trainer.testing import build_tiny_model, generic_corpus

    base = build_tiny_model(tmp_path / "base", texts=generic_corpus(200))
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                             LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    adapted.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "adapter")  # as the trainer's export does
    client = AdapterJobClient(base, tmp_path / "adapter")

    assert command_pull(client, SimpleNamespace(name="job", dest=str(tmp_path / "merged"), no_merge=False)) == 0
    assert command_pull(client, SimpleNamespace(name="job", dest=str(tmp_path / "kept"), no_merge=True)) == 0

    merged = tmp_path / "merged"
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(merged)
    assert (tmp_path / "kept" / "adapter_config.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".ftj-pull-")]


def test_each_storage_reads_the_credentials_in_the_environment_now(monkeypatch: pytest.MonkeyPatch) -> None:
    # boto3's default session keeps the first credentials it resolved; a notebook that switches AWS_* keys must not
    # go on signing with the old ones (the server answers SignatureDoesNotMatch).
    from finetune_client.storage import ObjectStorage

    keys = []
    for key in ("first-key", "second-key"):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"{key}-secret")
        storage = ObjectStorage(endpoint="http://127.0.0.1:1", region="us-east-1")
        keys.append(storage._client._request_signer._credentials.access_key)
    assert keys == ["first-key", "second-key"]


@pytest.mark.parametrize(
    ("tracking", "line"),
    [
        pytest.param({"runId": "r1", "url": "http://mlflow/#/experiments/1/runs/r1", "reachable": True},
                     "tracking   http://mlflow/#/experiments/1/runs/r1", id="reachable"),
        pytest.param({"runId": "r1", "url": "http://mlflow/#/experiments/1/runs/r1", "reachable": False},
                     "tracking   http://mlflow/#/experiments/1/runs/r1  (tracking server not answering)",
                     id="unreachable"),
        pytest.param(None, None, id="no-tracking"),
    ],
)
def test_status_names_the_tracking_run(tracking: dict[str, Any] | None, line: str | None) -> None:
    from finetune_client.job_view import Job

    status: dict[str, Any] = {"phase": "Running", **({"tracking": tracking} if tracking else {})}
    lines = cli.status_text(Job({"metadata": {"name": "bot"}, "status": status}), []).splitlines()
    assert [item for item in lines if item.startswith("tracking")] == ([line] if line else [])
