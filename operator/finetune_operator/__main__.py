"""``python -m finetune_operator``: run the FineTuneJob operator with settings from the environment and flags."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence

from finetune_operator.kopf_import import import_kopf
from finetune_operator.settings import SettingsError, load_settings


def main(argv: Sequence[str] | None = None) -> None:
    try:
        settings = load_settings(argv)
    except SettingsError as error:
        print(f"finetune-operator: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    # kopf first, without the kubernetes client; the handlers import it again from sys.modules.
    kopf = import_kopf()
    from finetune_operator.handlers import operate

    kopf.configure(log_format=kopf.LogFormat.PLAIN)
    logging.getLogger().setLevel(settings.log_level)
    # aiohttp's access log drowns everything else at INFO.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # kopf.operator() handles SIGINT/SIGTERM itself (graceful stop of handlers and timers).
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(operate(settings))


if __name__ == "__main__":
    main()
