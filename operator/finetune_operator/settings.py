"""The operator's settings from environment variables and command-line flags (a flag wins over its variable)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from finetune_operator import constants as c


class SettingsError(ValueError):
    """A setting has a value the operator cannot use; the message names the variable or flag."""


@dataclass(frozen=True)
class Settings:
    # Namespaces watched; empty means every namespace (cluster-wide).
    namespaces: tuple[str, ...] = ()
    trainer_image: str = c.DEFAULT_TRAINER_IMAGE
    metrics_port: int = c.DEFAULT_METRICS_PORT
    health_port: int = c.DEFAULT_HEALTH_PORT
    # The address both endpoints bind: all interfaces in a pod (probes and Prometheus come from outside).
    bind_address: str = c.DEFAULT_BIND_ADDRESS
    # kopf peering name for HA with several replicas; None runs standalone.
    peering: str | None = None
    resync_seconds: float = c.DEFAULT_RESYNC_SECONDS
    # Least time between two readings of a job's progress (each one is a status write).
    progress_seconds: float = c.DEFAULT_PROGRESS_SECONDS
    log_level: str = c.DEFAULT_LOG_LEVEL
    kubeconfig: str | None = None

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def liveness_endpoint(self) -> str:
        host = f"[{self.bind_address}]" if ":" in self.bind_address else self.bind_address
        return f"http://{host}:{self.health_port}{c.HEALTH_PATH}"


def _port(value: str, where: str) -> int:
    try:
        port = int(value)
    except ValueError as exc:
        raise SettingsError(f"{where}: {value!r} is not a port number") from exc
    if not 0 <= port <= 65535:
        raise SettingsError(f"{where}: {port} is not a port number (0-65535)")
    return port


def _seconds(value: str, where: str) -> float:
    try:
        seconds = float(value)
    except ValueError as exc:
        raise SettingsError(f"{where}: {value!r} is not a number of seconds") from exc
    if seconds <= 0:
        raise SettingsError(f"{where}: must be more than 0, got {seconds:g}")
    return seconds


def _log_level(value: str, where: str) -> str:
    level = value.upper()
    if not isinstance(logging.getLevelName(level), int):
        raise SettingsError(f"{where}: {value!r} is not a log level (DEBUG, INFO, WARNING, ERROR)")
    return level


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_operator",
        description="The FineTuneJob operator. Every flag has an environment variable; the flag wins.",
    )
    parser.add_argument("--namespace", action="append", dest="namespaces", metavar="NS",
                        help=f"namespace to watch (repeatable; default all). Env {c.ENV_NAMESPACES}, comma-separated")
    parser.add_argument("--trainer-image", help=f"default trainer image. Env {c.ENV_TRAINER_IMAGE}")
    parser.add_argument("--metrics-port", help=f"operator metrics port. Env {c.ENV_METRICS_PORT}")
    parser.add_argument("--health-port", help=f"liveness port (/healthz). Env {c.ENV_HEALTH_PORT}")
    parser.add_argument("--bind-address", help=f"address of both endpoints. Env {c.ENV_BIND_ADDRESS}")
    parser.add_argument("--peering", help=f"peering name (HA); absent: standalone. Env {c.ENV_PEERING}")
    parser.add_argument("--resync-seconds", help=f"seconds between resyncs of each job. Env {c.ENV_RESYNC_SECONDS}")
    parser.add_argument("--progress-seconds", help=f"min. seconds between progress reads. Env {c.ENV_PROGRESS_SECONDS}")
    parser.add_argument("--log-level", help=f"DEBUG, INFO, WARNING or ERROR. Env {c.ENV_LOG_LEVEL}")
    parser.add_argument("--kubeconfig", metavar="PATH",
                        help="kubeconfig file; default in-cluster service account, then $KUBECONFIG, ~/.kube/config")
    return parser


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``environ`` (default os.environ) overridden by ``argv`` flags."""
    env = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)

    def pick(flag: str | None, name: str) -> tuple[str | None, str]:
        if flag is not None:
            return flag, "--" + name.removeprefix("FINETUNE_").lower().replace("_", "-")
        value = env.get(name)
        return (value if value else None), name

    namespaces: tuple[str, ...]
    if args.namespaces:
        namespaces = tuple(ns for item in args.namespaces for ns in item.split(",") if ns.strip())
    else:
        namespaces = tuple(ns.strip() for ns in env.get(c.ENV_NAMESPACES, "").split(",") if ns.strip())
    image, _ = pick(args.trainer_image, c.ENV_TRAINER_IMAGE)
    metrics_port, metrics_where = pick(args.metrics_port, c.ENV_METRICS_PORT)
    health_port, health_where = pick(args.health_port, c.ENV_HEALTH_PORT)
    bind, _ = pick(args.bind_address, c.ENV_BIND_ADDRESS)
    peering, _ = pick(args.peering, c.ENV_PEERING)
    resync, resync_where = pick(args.resync_seconds, c.ENV_RESYNC_SECONDS)
    progress, progress_where = pick(args.progress_seconds, c.ENV_PROGRESS_SECONDS)
    level, level_where = pick(args.log_level, c.ENV_LOG_LEVEL)
    defaults = Settings()
    return Settings(
        namespaces=tuple(dict.fromkeys(ns.strip() for ns in namespaces)),
        trainer_image=image or defaults.trainer_image,
        metrics_port=_port(metrics_port, metrics_where) if metrics_port else defaults.metrics_port,
        health_port=_port(health_port, health_where) if health_port else defaults.health_port,
        bind_address=bind or defaults.bind_address,
        peering=peering,
        resync_seconds=_seconds(resync, resync_where) if resync else defaults.resync_seconds,
        progress_seconds=_seconds(progress, progress_where) if progress else defaults.progress_seconds,
        log_level=_log_level(level, level_where) if level else defaults.log_level,
        kubeconfig=args.kubeconfig or None,
    )
