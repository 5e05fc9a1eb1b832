"""What a checkpoint in object storage is: its layout, its manifest, and the rules for keeping and resuming it.

Layout: ``<output.uri>/checkpoints/step-NNNNNNNN/`` holds the files HF Trainer + DeepSpeed wrote locally into
``<local.workDir>/checkpoints/checkpoint-N/`` (same relative paths) and ``manifest.json``, written LAST: every
file's relative path, size and sha256, the step, ``TrainerConfig.config_hash()``, the world size, the time, the
eval loss measured at that step and the tokens trained on so far. A checkpoint without a valid manifest does not
exist: it is never resumed from and retention deletes it.

Retention: the newest ``checkpoint.keep`` complete checkpoints plus the best one (lowest eval loss measured at its
step) stay; everything else under ``checkpoints/`` older than the newest complete one is deleted (newer folders
may be the upload in flight).

Saving, uploading and committing follow ``checkpoint_protocol``; finding and restoring one, ``resume``; SIGTERM,
``distributed``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from finetune_trainer.config import TrainerConfig

CHECKPOINTS_DIR = "checkpoints"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
# An upload (a checkpoint's, the export's) keeps retrying (storage restarts, throttling) this long before it is
# abandoned; a checkpoint download, this long before the next older checkpoint is tried.
BACKGROUND_UPLOAD_BUDGET_S = 600.0


class ManifestError(ValueError):
    """A manifest does not parse or does not describe a usable checkpoint."""


# --- names --------------------------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_key(step: int) -> str:
    """The checkpoint's folder, relative to ``output.uri`` (the root of the trainer's output store)."""
    return f"{CHECKPOINTS_DIR}/{checkpoint_name(step)}/"


def parse_checkpoint_name(name: str) -> int | None:
    if len(name) == 13 and name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None


def local_checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """Where HF Trainer writes (and resume places) the checkpoint of ``step``."""
    return Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


# --- manifest -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    step: int
    configHash: str
    worldSize: int
    time: str
    files: list[FileEntry]
    evalLoss: float | None = None
    tokensSeen: int = 0
    format: int = MANIFEST_FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            raw = json.loads(data)
            files = [FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in raw["files"]]
            manifest = cls(
                step=int(raw["step"]),
                configHash=str(raw["configHash"]),
                worldSize=int(raw["worldSize"]),
                time=str(raw["time"]),
                files=files,
                evalLoss=None if raw.get("evalLoss") is None else float(raw["evalLoss"]),
                tokensSeen=int(raw.get("tokensSeen", 0)),
                format=int(raw.get("format", MANIFEST_FORMAT)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ManifestError(f"manifest does not parse: {exc}") from exc
        if manifest.format != MANIFEST_FORMAT:
            raise ManifestError(f"manifest format {manifest.format} is not {MANIFEST_FORMAT}")
        if not files:
            raise ManifestError("manifest lists no files")
        for entry in files:
            if entry.path.startswith("/") or ".." in Path(entry.path).parts or entry.path == MANIFEST_NAME:
                raise ManifestError(f"manifest names an unsafe path {entry.path!r}")
            if entry.size < 0 or len(entry.sha256) != 64:
                raise ManifestError(f"manifest entry {entry.path!r} has no valid size or sha256")
        return manifest

    def missing_or_wrong(self, stored_sizes: dict[str, int]) -> list[str]:
        """Files of this manifest absent from ``stored_sizes`` or stored with another size."""
        return [f.path for f in self.files if stored_sizes.get(f.path) != f.size]


def list_local_files(folder: Path) -> list[str]:
    """Relative paths of the regular files under ``folder``, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --- pure decisions -----------------------------------------------------------------------------------------------


def retained_steps(complete: dict[int, float | None], keep: int) -> set[int]:
    """Steps to keep among complete checkpoints {step: eval loss}: the newest ``keep`` plus the lowest eval loss."""
    kept = set(sorted(complete, reverse=True)[:keep])
    best = best_step(complete)
    if best is not None:
        kept.add(best)
    return kept


def best_step(complete: dict[int, float | None]) -> int | None:
    """The complete checkpoint with the lowest eval loss (None when none has one)."""
    scored = [(loss, step) for step, loss in complete.items() if loss is not None and not math.isnan(loss)]
    return min(scored)[1] if scored else None


def assign_uploads(listings: list[list[str] | None]) -> list[list[str]]:
    """Per node, the files it uploads: each file once, by the lowest node that has it."""
    taken: set[str] = set()
    owned: list[list[str]] = []
    for files in listings:
        mine = [f for f in (files or []) if f not in taken]
        taken.update(mine)
        owned.append(mine)
    return owned


def needs_universal(config: TrainerConfig, manifest: Manifest, world_size: int) -> bool:
    """Whether the checkpoint's ZeRO shards were cut for another world size."""
    return manifest.worldSize != world_size and config.deepspeed.zeroStage > 0
