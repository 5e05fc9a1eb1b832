"""Shared set-up of the trainer's integration tests: a tiny model and chat data in S3, configs, the launcher run."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from localcluster.seaweedfs import SeaweedFS

RUN_TIMEOUT_S = 300
# The tiny model and its data are built once per session and uploaded into each test's bucket.
_BUILT: dict[str, Path] = {}


def free_port() -> int:
    """A free port below the ephemeral range, so no outgoing connection takes it before the server binds it."""
    return free_metrics_port(1)


def free_metrics_port(ranks: int = 2) -> int:
    """A port p with p .. p + ranks - 1 free, below the ephemeral range (32768-): a scrape of a port nobody listens
    on yet must not be able to take it as its own source port (a local TCP connection can connect to itself)."""
    rng = random.Random()
    for _ in range(200):
        low = rng.randrange(20000, 32000 - ranks)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(low, low + ranks):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
        except OSError:
            continue
        return low
    raise RuntimeError("no free metrics ports")


def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``model/`` (2-layer GPT-2, 64 dims, its tokenizer) and ``data/train.jsonl`` (chat rows)."""
    if "assets" in _BUILT:
        return _BUILT["assets"]
    from finetune_trainer.testing import build_tiny_model, generic_corpus, toy_chat_rows

    root = tmp_path_factory.mktemp("tiny-assets")
    rows = toy_chat_rows(240, seed=1)
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    texts = generic_corpus(400) + [m["content"] for row in rows for m in row["messages"]]
    build_tiny_model(root / "model", texts=texts)
    _BUILT["assets"] = root
    return root


def upload_folder(s3: Any, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def make_setup(
    seaweedfs: SeaweedFS, bucket: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> TrainerSetup:
    """The tiny model under ``model/`` and the chat data under ``data/`` of ``bucket``."""
    assets = tiny_assets(tmp_path_factory)
    setup = TrainerSetup(seaweedfs, bucket, tmp_path)
    upload_folder(setup.s3, bucket, assets / "model", "model")
    upload_folder(setup.s3, bucket, assets / "data", "data")
    return setup


@dataclass
class TrainerSetup:
    """One test's bucket with the model and data in it, and where the runs' local files go."""

    seaweedfs: SeaweedFS
    bucket: str
    root: Path
    launched: list[Launched] = field(default_factory=list)

    def close(self) -> None:
        """Stop what a failed test left running (the launcher takes torchrun and the ranks with it)."""
        for run in self.launched:
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait()

    @property
    def s3(self) -> Any:
        return self.seaweedfs.client()

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def write_config(self, name: str = "config.json", node: int = 0, **sections: dict[str, Any]) -> Path:
        """A config for this bucket; ``sections`` override keys of the default sections (tiny and fast)."""
        config: dict[str, Any] = {
            "model": {"uri": self.uri("model")},
            "dataset": {"uri": self.uri("data/train.jsonl"), "format": "chat", "evalSplit": 0.1},
            "output": {"uri": self.uri("run")},
            "training": {
                "maxSteps": 20,
                "batchSize": 4,
                "maxSeqLength": 64,
                "learningRate": 0.003,
                "warmupRatio": 0.1,
                "logEvery": 2,
                "evalEvery": 10,
            },
            "deepspeed": {"zeroStage": 2},
            "checkpoint": {"everySteps": 10, "keep": 2, "gracePeriodSeconds": 60},
            "metrics": {"port": free_metrics_port()},
            "storage": {"forcePathStyle": True},
            "local": {
                "cacheDir": str(self.root / f"node{node}" / "cache"),
                "workDir": str(self.root / f"node{node}" / "work"),
            },
            "job": {"name": "test", "namespace": "tests"},
        }
        for key, value in sections.items():
            config[key] = {**config.get(key, {}), **value}
        path = self.root / name
        path.write_text(json.dumps(config, indent=1))
        return path

    def env(self, nproc: int = 1, **extra: str) -> dict[str, str]:
        termination = self.root / "termination-log"
        termination.touch()
        env = {
            **os.environ,
            **self.seaweedfs.env(),
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "FINETUNE_TERMINATION_LOG": str(termination),
            "PET_NPROC_PER_NODE": str(nproc),
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(free_port()),
        }
        env.update(extra)
        return env

    @property
    def termination_message(self) -> str:
        return (self.root / "termination-log").read_text()

    def start_launcher(self, config: Path, env: dict[str, str], log_name: str = "launcher.log") -> Launched:
        log_path = self.root / log_name
        handle = log_path.open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "finetune_trainer.launch", "--config", str(config)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        handle.close()
        self.launched.append(Launched(process, log_path))
        return self.launched[-1]

    def run_launcher(self, config: Path, nproc: int = 1, **env: str) -> Launched:
        launched = self.start_launcher(config, self.env(nproc, **env))
        launched.wait()
        return launched

    # --- reading results back -----------------------------------------------------------------------------

    def keys(self, prefix: str) -> dict[str, int]:
        found: dict[str, int] = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = int(item["Size"])
        return found

    def read_json(self, key: str) -> Any:
        return json.loads(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def node_log(self, attempt: int = 0, node: int = 0) -> str:
        """The launcher's log as uploaded to ``run/logs/attempt-<attempt>/node-<node>.log``."""
        key = f"run/logs/attempt-{attempt}/node-{node}.log"
        return str(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read().decode())

    def result(self) -> dict[str, Any]:
        return dict(self.read_json("run/result.json"))

    def complete_checkpoints(self) -> dict[int, dict[str, Any]]:
        """{step: manifest} of every checkpoint whose manifest's files are all present with their sizes."""
        stored = self.keys("run/checkpoints/")
        found: dict[int, dict[str, Any]] = {}
        for key in stored:
            if not key.endswith("/manifest.json"):
                continue
            folder = key[: -len("manifest.json")]
            manifest = self.read_json(key)
            if all(stored.get(folder + f["path"]) == f["size"] for f in manifest["files"]):
                found[int(manifest["step"])] = manifest
        return found

    def download(self, prefix: str, target: Path) -> Path:
        for key in self.keys(prefix):
            local = target / key[len(prefix) :]
            local.parent.mkdir(parents=True, exist_ok=True)
            self.s3.download_file(self.bucket, key, str(local))
        return target


@dataclass
class Launched:
    process: subprocess.Popen[bytes]
    log_path: Path

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the launcher ran longer than {timeout} s; log:\n{self.log()[-4000:]}") from None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)


def worker_pids(config: Path) -> list[int]:
    """PIDs of the trainer ranks (``-m finetune_trainer``) started for ``config``, not torchrun or the launcher."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        modules = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "-m"]
        if modules[:1] == ["finetune_trainer"] and str(config) in args:
            found.append(int(entry.name))
    return sorted(found)


def scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return str(answer.read().decode())
    # Before the server listens, a connection to a free local port can even connect to itself (BadStatusLine).
    except (OSError, http.client.HTTPException):
        return None


def metric_value(text: str, name: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None
