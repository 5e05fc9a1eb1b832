"""Operator settings: the Helm chart's environment variables, overridden by flags."""

from __future__ import annotations

import pytest

from finetune_operator.settings import Settings, SettingsError, load_settings


def test_defaults() -> None:
    assert load_settings([], {}) == Settings(
        namespaces=(), trainer_image="ghcr.io/finetunejob/finetune-trainer:0.1.0", metrics_port=8080,
        health_port=8081, bind_address="0.0.0.0", peering=None, resync_seconds=5.0, progress_seconds=10.0,
        log_level="INFO", kubeconfig=None,
    )
    assert load_settings([], {}).clusterwide


def test_environment() -> None:
    env = {
        "FINETUNE_NAMESPACES": "team-a, team-b",
        "FINETUNE_TRAINER_IMAGE": "reg/trainer:1",
        "FINETUNE_METRICS_PORT": "9090",
        "FINETUNE_HEALTH_PORT": "9091",
        "FINETUNE_PEERING": "finetune",
        "FINETUNE_RESYNC_SECONDS": "2.5",
        "FINETUNE_PROGRESS_SECONDS": "30",
        "FINETUNE_LOG_LEVEL": "debug",
        "FINETUNE_BIND_ADDRESS": "127.0.0.1",
    }
    settings = load_settings([], env)
    assert settings == Settings(namespaces=("team-a", "team-b"), trainer_image="reg/trainer:1", metrics_port=9090,
                                health_port=9091, bind_address="127.0.0.1", peering="finetune", resync_seconds=2.5,
                                progress_seconds=30.0, log_level="DEBUG")
    assert not settings.clusterwide
    assert settings.liveness_endpoint == "http://127.0.0.1:9091/healthz"


def test_flags_win_over_environment() -> None:
    env = {"FINETUNE_NAMESPACES": "team-a", "FINETUNE_METRICS_PORT": "9090", "FINETUNE_TRAINER_IMAGE": "env/img"}
    settings = load_settings(["--namespace", "x", "--namespace", "y", "--metrics-port", "0", "--trainer-image",
                              "flag/img", "--kubeconfig", "/tmp/kc"], env)
    assert (settings.namespaces, settings.metrics_port, settings.trainer_image, settings.kubeconfig) == (
        ("x", "y"), 0, "flag/img", "/tmp/kc")


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"FINETUNE_METRICS_PORT": "http"}, "FINETUNE_METRICS_PORT: 'http' is not a port number"),
        (["--health-port", "70000"], {}, "--health-port: 70000 is not a port number"),
        ([], {"FINETUNE_RESYNC_SECONDS": "0"}, "FINETUNE_RESYNC_SECONDS: must be more than 0"),
        (["--log-level", "loud"], {}, "--log-level: 'loud' is not a log level"),
    ],
)
def test_bad_values_name_the_setting(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match="^" + message.replace("(", r"\(")):
        load_settings(argv, env)
