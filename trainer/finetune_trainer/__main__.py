"""One trainer rank: ``python -m finetune_trainer --config FILE``, what torchrun starts on every rank of a node.

A pod runs ``python -m finetune_trainer.launch`` instead, which validates the config and starts torchrun over this
module. Run by hand without torchrun, this is a gang of one. The exit code follows ``exit_codes``; the code and a
one-line reason are also recorded in ``<local.workDir>/exit-status/rank-<RANK>.json`` for the launcher.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from finetune_trainer import exit_codes
from finetune_trainer.config import ConfigError, TrainerConfig, load_config
from finetune_trainer.launch import CONFIG_ENV, die_with_parent, write_exit_status

log = logging.getLogger("finetune_trainer")


def main(argv: list[str] | None = None) -> int:
    # If torchrun is killed outright, its workers must not train on as orphans.
    die_with_parent()
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer", description="Run one trainer rank.")
    parser.add_argument("--config", default=os.environ.get(CONFIG_ENV), help=f"config file (default ${CONFIG_ENV})")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    if not args.config:
        print(f"finetune-trainer: config: no config file given (--config or ${CONFIG_ENV})", file=sys.stderr)
        return exit_codes.INVALID
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"finetune-trainer: invalid config: {exc}", file=sys.stderr)
        return exit_codes.INVALID

    code, reason = run_rank(config)
    write_exit_status(config, rank, code, reason)
    if code != exit_codes.SUCCESS:
        print(f"finetune-trainer rank {rank}: exit {code}: {reason}", file=sys.stderr, flush=True)
    return code


def run_rank(config: TrainerConfig) -> tuple[int, str]:
    """Run training and map every way it can end to (exit code, one-line reason)."""
    # Imported here: torch and transformers take seconds to import, the config check above does not need them.
    import torch.distributed as dist

    from finetune_trainer import train
    from finetune_trainer.data_rows import DataError
    from finetune_trainer.storage import StorageError

    try:
        outcome = train.run(config)
        return outcome.code, outcome.reason
    except (ConfigError, DataError) as exc:
        return exit_codes.INVALID, str(exc)
    except StorageError as exc:
        if exc.permanent:
            return exit_codes.INVALID, str(exc)
        log.error("storage failed:\n%s", traceback.format_exc())
        return exit_codes.FAILURE, str(exc)
    except Exception as exc:  # every crash becomes a logged FAILURE with a reason, never a bare traceback exit
        log.error("training failed:\n%s", traceback.format_exc())
        return exit_codes.FAILURE, f"{type(exc).__name__}: {exc}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
