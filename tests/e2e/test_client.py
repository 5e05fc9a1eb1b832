"""The client and the ftj command on the local cluster: the Python loop end to end, ftj driven in a real terminal
(tmux), kubectl's plugin lookup, the loss plot, and bad inputs refused before anything is created."""

from __future__ import annotations

import functools
import json
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import ftj, s3_keys

from finetune_client import Client, Dataset, FineTuneJob, Model, Output, Resources, Storage, Training
from finetune_client.job import Checkpoint
from localcluster import pytest_plugin
from localcluster.cluster import CREDENTIALS_SECRET, REPO, LocalCluster

pytestmark = pytest.mark.e2e

wait_until = functools.partial(pytest_plugin.wait_until, interval=0.5)
TMUX = "/usr/bin/tmux"
SMALL = Resources(cpu="1", memory="3Gi")
DATASET = REPO / "examples" / "data" / "customer-support.jsonl"
EXAMPLE = str(REPO / "examples" / "tiny-cpu.yaml")


def small_job(name: str, data_uri: str, steps: int) -> FineTuneJob:
    return FineTuneJob(
        name,
        model=Model("s3://models/tiny-gpt2"),
        dataset=Dataset(data_uri, format="chat", eval_split=0.1),
        output=Output(f"s3://finetune-output/{name}"),
        training=Training(max_steps=steps, learning_rate=0.003, batch_size=8, max_seq_length=256, log_every=2,
                          eval_every=10),
        checkpoint=Checkpoint(every_steps=10, keep=1),
        resources=SMALL,
        storage=Storage(credentials_secret=CREDENTIALS_SECRET, force_path_style=True),
    )


def test_client_uploads_rows_trains_and_reads_back_history_result_and_model(
    cluster: LocalCluster, client: Client, tmp_path: Path
) -> None:
    rows = [json.loads(line) for line in DATASET.read_text().splitlines()]
    uri = client.upload_dataset(rows, "s3://datasets/client/", data_format="chat")
    assert uri == "s3://datasets/client/data.jsonl"
    client.create(small_job("client-loop", uri, steps=20))
    # Followed from before the pod starts until it ends (the job's pods are deleted once it finishes).
    log = list(client.logs("client-loop", follow=True))
    assert any("rank0 INFO" in line for line in log), log[-20:]
    seen: list[tuple[str, int]] = []

    job = client.wait("client-loop", timeout=600, progress=lambda j: seen.append((j.phase, j.step)))

    assert job.phase == "Succeeded", job.status
    assert seen[-1] == ("Succeeded", 20)
    history = client.history("client-loop")
    assert [e["step"] for e in history if "loss" in e] == list(range(2, 21, 2))
    assert [e["step"] for e in history if "evalLoss" in e] == [0, 10, 20]
    result = client.result("client-loop")
    assert result["steps"] == 20 and result["evalLossAfter"] < result["evalLossBefore"]
    assert any(e["reason"] for e in client.events("client-loop"))
    model_dir = client.download_model("client-loop", tmp_path / "model")
    assert (model_dir / "model.safetensors").is_file()

    from finetune_client import chat

    model, tokenizer = chat.load_model(model_dir, lambda: pytest.fail("a full export needs no base model"))
    reply = chat.answer(model, tokenizer, [{"role": "user", "content": "Where is my order?"}], max_new_tokens=12)
    assert reply.strip(), "the fine-tuned model answered nothing"


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[str]:
    """A tmux server on a private socket, always killed at the end."""
    socket = f"ftj-test-{uuid.uuid4().hex[:8]}"
    try:
        yield socket
    finally:
        subprocess.run([TMUX, "-L", socket, "kill-server"], capture_output=True)


def pane(socket: str) -> str:
    return subprocess.run([TMUX, "-L", socket, "capture-pane", "-p", "-t", "ftj"], capture_output=True,
                          text=True).stdout


def shown_step(text: str) -> int | None:
    """The step of the live view's progress line, e.g. ``[####....]  12/120  10.0%``."""
    for line in text.splitlines():
        if line.startswith("[") and "/" in line:
            return int(line.split("]")[1].split("/")[0])
    return None


@pytest.mark.skipif(not Path(TMUX).exists(), reason="needs tmux")
def test_ftj_run_in_a_terminal_shows_the_live_view_and_detaches_on_ctrl_c(
    cluster: LocalCluster, user_env: dict[str, str], tmux: str, tmp_path: Path
) -> None:
    name = "ftj-live"
    script = tmp_path / "run.sh"
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in user_env.items() if k.isidentifier())
    script.write_text(exports + f"cd {shlex.quote(str(REPO))}\n" + shlex.join([
        "ftj", "run", name, "-f", EXAMPLE, "--data", str(DATASET), "--model", "s3://models/tiny-gpt2",
        "--max-steps", "300", "--log-every", "2", "--eval-every", "20", "--checkpoint-every", "40", "--cpu", "1",
        "--memory", "3Gi"]) + "\necho ftj-exit=$?\n")
    subprocess.run([TMUX, "-L", tmux, "-f", "/dev/null", "new-session", "-d", "-s", "ftj", "-x", "110", "-y", "30",
                    f"bash {shlex.quote(str(script))}; sleep 600"], check=True)

    first = wait_until(lambda: shown_step(pane(tmux)) or None, timeout=300, what="the live view's first step")
    later = wait_until(lambda: (s := shown_step(pane(tmux))) is not None and s > first and pane(tmux),
                       timeout=300, what="the live view's step rising")
    assert "Running" in later and "loss      " in later and "tokens/s" in later and "ETA" in later, later
    assert any(line.startswith("loss") and any(c.isdigit() for c in line) for line in later.splitlines()), later
    subprocess.run([TMUX, "-L", tmux, "send-keys", "-t", "ftj", "C-c"], check=True)
    detached = wait_until(lambda: "ftj-exit=" in (text := pane(tmux)) and text, timeout=30, what="ftj to detach")
    assert f"detached: {name} keeps running" in detached and "ftj-exit=0" in detached, detached
    assert f"uploads/{name}/data/customer-support.jsonl" in "".join(s3_keys(cluster, "uploads/"))

    done = ftj(user_env, "wait", name, "--timeout", "600", timeout=660)
    assert done.returncode == 0 and "Succeeded" in done.stdout, done

    # kubectl finds the plugin on PATH by its name, as it would for a user.
    listed = subprocess.run(["kubectl", "ftj", "ls"], env=user_env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:3] == [name, "Succeeded", "300/300"] for line in listed.stdout.splitlines()), listed.stdout

    png = tmp_path / "loss.png"
    plotted = ftj(user_env, "plot", name, "-o", str(png))
    assert plotted.returncode == 0, plotted.stderr
    from PIL import Image

    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (800, 450)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16) or []
    # Lines in two colours on white: many colours (antialiasing), and both tab:blue and tab:orange present.
    assert len(colours) > 20
    assert any(rgb == (31, 119, 180) for _, rgb in colours) and any(rgb == (255, 127, 14) for _, rgb in colours)

    status = ftj(user_env, "status", name, "--output", "json")
    assert status.returncode == 0 and json.loads(status.stdout)["phase"] == "Succeeded"


def test_bad_inputs_are_one_line_exit_2_and_create_nothing(
    cluster: LocalCluster, user_env: dict[str, str], tmp_path: Path
) -> None:
    before = cluster.kubectl("get", "ftj", "-o", "name")
    malformed_yaml = tmp_path / "job.yaml"
    malformed_yaml.write_text("apiVersion: finetune.dev/v1alpha1\nkind: FineTuneJob\nspec: {model: [\n")
    rows = tmp_path / "rows.jsonl"
    good = DATASET.read_text().splitlines()[0]
    rows.write_text(f"{good}\n{good}\n" + json.dumps({"messages": [{"role": "robot", "content": "beep"}]}) + "\n")
    cases = [
        (["status", "no-such-job"], "FineTuneJob default/no-such-job not found"),
        (["run", "-f", str(malformed_yaml)], f"{malformed_yaml}:4: not valid YAML"),
        (["run", "bad-rows", "-f", EXAMPLE, "--data", str(rows)],
         f"{rows}:3: messages[0]: unknown role 'robot'"),
    ]
    for argv, message in cases:
        result = ftj(user_env, *argv)
        assert result.returncode == 2, (argv, result)
        assert result.stderr.count("\n") == 1 and message in result.stderr, (argv, result.stderr)
        assert "Traceback" not in result.stderr
    assert cluster.kubectl("get", "ftj", "-o", "name") == before
    assert s3_keys(cluster, "uploads/bad-rows/") == []
    unreachable = {**user_env, "KUBECONFIG": str(tmp_path / "none")}
    (tmp_path / "none").write_text(cluster.kubeconfig.read_text().replace(cluster.url, "https://127.0.0.1:1"))
    result = ftj(unreachable, "run", "bad-rows", "-f", EXAMPLE, "--data", str(DATASET))
    assert result.returncode == 2 and "cannot reach the Kubernetes API" in result.stderr, result
    assert s3_keys(cluster, "uploads/bad-rows/") == []
    assert shutil.which("ftj", path=user_env["PATH"])
