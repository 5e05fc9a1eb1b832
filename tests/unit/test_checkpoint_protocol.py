"""The checkpoint protocol on one rank with a file:// store: saves, uploads, manifests, retention, SIGTERM, resume."""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from trainer_factories import make_config
from transformers import TrainerControl, TrainerState

from finetune_trainer.checkpoint_protocol import CheckpointCallback, CheckpointProtocol, StepDecision
from finetune_trainer.checkpoints import MANIFEST_NAME, Manifest, checkpoint_key, local_checkpoint_dir
from finetune_trainer.config import TrainerConfig
from finetune_trainer.distributed import DistContext, Preemption
from finetune_trainer.metrics import TokenCounter
from finetune_trainer.resume import restore_checkpoint
from finetune_trainer.storage import FileStore, StorageError

# Waits for a thread that must make progress; only ever reached when the protocol hangs.
PATIENCE_S = 30.0


class RecordingStore(FileStore):
    """A file:// store that records every upload: the checkpoint folder, in what order, and whether gently."""

    def __init__(self, root: Path) -> None:
        super().__init__(f"file://{root}", root)
        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []  # ("start" | "end", checkpoint folder)
        self.uploading: dict[str, int] = {}
        self.overlaps: list[set[str]] = []
        self.background: dict[str, bool] = {}

    def upload_file(self, src: str | Path, key: str, *, background: bool = False) -> Any:
        folder = key.split("/")[1]
        with self.lock:
            self.events.append(("start", folder))
            self.uploading[folder] = self.uploading.get(folder, 0) + 1
            if len(self.uploading) > 1:
                self.overlaps.append(set(self.uploading))
            self.background[key] = background
        try:
            self.before_upload(folder)
            return super().upload_file(src, key, background=background)
        finally:
            with self.lock:
                self.events.append(("end", folder))
                self.uploading[folder] -= 1
                if not self.uploading[folder]:
                    del self.uploading[folder]

    def before_upload(self, folder: str) -> None:
        """Where a test holds an upload back or makes it fail."""


class Setup:
    def __init__(self, tmp_path: Path, store: FileStore | None = None, **checkpoint: Any) -> None:
        self.config: TrainerConfig = make_config(
            output={"uri": f"file://{tmp_path}/out"},
            local={"workDir": str(tmp_path / "work"), "cacheDir": str(tmp_path / "cache")},
            checkpoint={"everySteps": 10, "keep": 2, **checkpoint},
        )
        self.store = store or RecordingStore(tmp_path / "out")
        self.output_dir = tmp_path / "work" / "checkpoints"
        self.preemption = Preemption()
        self.protocol = self.new_protocol()

    def new_protocol(self) -> CheckpointProtocol:
        return CheckpointProtocol(self.config, self.store, DistContext(), self.preemption, TokenCounter())

    def write_checkpoint(self, step: int) -> Path:
        """What HF Trainer and DeepSpeed write for a save at ``step``."""
        folder = local_checkpoint_dir(self.output_dir, step)
        (folder / f"global_step{step}").mkdir(parents=True)
        (folder / f"global_step{step}" / "mp_rank_00_model_states.pt").write_bytes(f"weights {step}".encode() * 1000)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (folder / "latest").write_text(f"global_step{step}")
        return folder

    def save(self, step: int) -> None:
        decision = self.protocol.after_step(step)
        assert decision.save, f"no save asked for at step {step}"
        self.protocol.saved(step, self.write_checkpoint(step))

    def manifest(self, step: int) -> Manifest:
        return Manifest.from_json(self.store.get_bytes(checkpoint_key(step) + MANIFEST_NAME))

    def stored_steps(self) -> list[int]:
        return sorted({int(info.key.split("/")[1][5:]) for info in self.store.list("checkpoints/")})


@pytest.fixture
def sigterm() -> Iterator[None]:
    """SIGTERM handled by nothing but the Preemption a test installs; the test's own handler comes back after."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_saved_checkpoints_get_a_manifest_of_every_file_and_retention_keeps_the_newest(tmp_path: Path) -> None:
    setup = Setup(tmp_path, keep=2)
    setup.protocol.begin(0)

    for step in (10, 20, 30):
        setup.save(step)
    setup.protocol.finish()

    assert setup.stored_steps() == [20, 30]
    manifest = setup.manifest(30)
    uploaded = {entry.path: entry for entry in manifest.files}
    weights = "global_step30/mp_rank_00_model_states.pt"
    assert sorted(uploaded) == ["global_step30/mp_rank_00_model_states.pt", "latest", "trainer_state.json"]
    assert uploaded[weights].sha256 == hashlib.sha256(b"weights 30" * 1000).hexdigest()
    assert (manifest.step, manifest.worldSize, manifest.configHash) == (30, 1, setup.config.config_hash())
    assert setup.protocol.last_complete_step == 30
    assert not any(setup.output_dir.iterdir()), "local copies are deleted once uploaded"
    assert set(setup.store.background.values()) == {True}, "uploads while training goes on are gentle"


def test_only_one_upload_is_in_flight_a_save_waits_for_the_previous_upload(tmp_path: Path) -> None:
    release = threading.Event()
    first_started = threading.Event()

    class HeldBack(RecordingStore):
        def before_upload(self, folder: str) -> None:
            if folder == "step-00000010":
                first_started.set()
                assert release.wait(PATIENCE_S)

    setup = Setup(tmp_path, store=HeldBack(tmp_path / "out"))
    setup.protocol.begin(0)
    setup.save(10)
    assert first_started.wait(PATIENCE_S)
    first_upload = setup.protocol.pending.upload if setup.protocol.pending else None
    assert first_upload is not None and first_upload.running
    waiting_for_first = threading.Event()
    original_wait = first_upload.wait

    def wait(deadline: float | None = None) -> None:
        waiting_for_first.set()
        original_wait(deadline)

    first_upload.wait = wait  # type: ignore[method-assign]
    second = threading.Thread(target=setup.save, args=(20,))
    second.start()

    assert waiting_for_first.wait(PATIENCE_S), "the save at step 20 did not wait for the upload of step 10"
    assert ("start", "step-00000020") not in setup.store.events
    release.set()
    second.join(PATIENCE_S)
    setup.protocol.finish()

    assert not second.is_alive()
    assert setup.store.overlaps == []
    events = setup.store.events
    first_ended = max(i for i, event in enumerate(events) if event == ("end", "step-00000010"))
    second_started = min(i for i, event in enumerate(events) if event == ("start", "step-00000020"))
    assert first_ended < second_started
    assert (setup.manifest(10).step, setup.manifest(20).step) == (10, 20)


def test_a_failed_upload_leaves_the_checkpoint_incomplete_and_the_next_one_completes(tmp_path: Path) -> None:
    class FailsOnce(RecordingStore):
        def before_upload(self, folder: str) -> None:
            if folder == "step-00000010":
                raise StorageError("AccessDenied", uri=self.uri_for(folder), permanent=True)

    setup = Setup(tmp_path, store=FailsOnce(tmp_path / "out"))
    setup.protocol.begin(0)

    setup.save(10)
    setup.save(20)
    setup.protocol.finish()

    assert not setup.store.exists(checkpoint_key(10) + MANIFEST_NAME)
    assert setup.manifest(20).step == 20
    assert setup.protocol.last_complete_step == 20


def test_sigterm_saves_an_emergency_checkpoint_that_is_complete_when_the_save_returns(
    tmp_path: Path, sigterm: None
) -> None:
    setup = Setup(tmp_path, everySteps=1000, gracePeriodSeconds=60)
    setup.preemption.install()
    setup.protocol.begin(0)
    signal.raise_signal(signal.SIGTERM)

    decision = setup.protocol.after_step(1)
    setup.protocol.saved(1, setup.write_checkpoint(1))

    assert decision == StepDecision(save=True, stop=True)
    assert setup.protocol.preempted and setup.protocol.emergency_step == 1
    assert setup.protocol.emergency_checkpoint_complete
    assert setup.manifest(1).step == 1
    assert set(setup.store.background.values()) == {False}, "the emergency upload uses every stream"
    restored, complete = restore_checkpoint(setup.config, setup.store, DistContext(), setup.output_dir)
    assert restored is not None and restored.step == 1 and list(complete) == [1]


def test_the_callback_turns_a_sigterm_into_save_stop_and_no_evaluation(tmp_path: Path, sigterm: None) -> None:
    setup = Setup(tmp_path, everySteps=1000)
    setup.preemption.install()
    callback = CheckpointCallback(setup.protocol)
    args: Any = SimpleNamespace(output_dir=str(setup.output_dir))
    state = TrainerState(global_step=0)
    control = TrainerControl(should_evaluate=True)
    callback.on_train_begin(args, state, control)
    signal.raise_signal(signal.SIGTERM)

    state.global_step = 1
    callback.on_step_end(args, state, control)
    setup.write_checkpoint(1)
    callback.on_save(args, state, control)

    assert (control.should_save, control.should_training_stop, control.should_evaluate) == (True, True, False)
    assert setup.manifest(1).step == 1


def test_resume_skips_a_checkpoint_whose_manifest_is_corrupt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    setup = Setup(tmp_path, keep=3)
    setup.protocol.begin(0)
    for step in (10, 20):
        setup.save(step)
    setup.protocol.finish()
    setup.store.put_bytes(checkpoint_key(20) + MANIFEST_NAME, b'{"step": 20, "files": [')

    restored, complete = restore_checkpoint(setup.config, setup.store, DistContext(), setup.output_dir)

    assert restored is not None and restored.step == 10
    assert complete == {10: None}
    weights = restored.path / "global_step10" / "mp_rank_00_model_states.pt"
    assert weights.read_bytes() == b"weights 10" * 1000
    assert "checkpoint step 20: manifest does not parse" in caplog.text
