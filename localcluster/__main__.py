"""Command line of the local cluster: ``python -m localcluster up`` (foreground) and ``python -m localcluster demo``."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from localcluster.cluster import LocalCluster

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def write_user_env(cluster: LocalCluster) -> Path:
    """A file to source: the kubeconfig, SeaweedFS's endpoint and keys, a bucket ``ftj run`` writes jobs under and
    the MLflow tracking server's URL.

    The keys go to this file (mode 0600), never to the terminal."""
    bucket = "finetune"
    cluster.s3.create_bucket(bucket)
    variables = {"KUBECONFIG": str(cluster.kubeconfig), **cluster.s3.env(), "FTJ_OUTPUT_PREFIX": f"s3://{bucket}"}
    if cluster.mlflow is not None:
        variables["MLFLOW_TRACKING_URI"] = cluster.mlflow.url
    path = cluster.work_dir / "env.sh"
    path.touch(mode=0o600)
    path.write_text("".join(f"export {key}={shlex.quote(value)}\n" for key, value in variables.items()))
    return path


def up(args: argparse.Namespace) -> int:
    from localcluster.cluster import CREDENTIALS_SECRET, LocalCluster

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="localcluster-"))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalCluster(
        work_dir, gpus=args.gpus, with_operator=not args.no_operator, with_mlflow=not args.no_mlflow
    ) as cluster:
        env_file = write_user_env(cluster)
        print(f"kubeconfig:   {cluster.kubeconfig}    (export KUBECONFIG={cluster.kubeconfig})")
        print(f"your shell:   source {env_file}    (kubeconfig, S3 endpoint and keys for kubectl, ftj, the client)")
        version = cluster.control_plane.version if cluster.control_plane else "?"
        print(f"API server:   {cluster.url} (Kubernetes {version}; the operator runs as {cluster.operator_identity})")
        print(f"S3 endpoint:  {cluster.s3.endpoint_url}  (credentials in Secret default/{CREDENTIALS_SECRET})")
        if cluster.prometheus:
            print(f"Prometheus:   {cluster.prometheus.url}")
        if cluster.mlflow is not None:
            print(f"MLflow:       {cluster.mlflow.url}  (spec.tracking.mlflow.trackingUri; artifacts in "
                  f"{cluster.mlflow.artifacts_uri})")
        if cluster.with_operator:
            print(
                f"operator:     metrics http://127.0.0.1:{cluster.operator_metrics_port}/metrics, "
                f"log {cluster.operator_log}"
            )
        print(
            "node:         localnode "
            f"(cpu {cluster.cpu}, memory {cluster.memory}, nvidia.com/gpu {cluster.gpus}); Ctrl-C stops everything",
            flush=True,
        )
        stop.wait()
        print("\nstopping", flush=True)
    return 0


def demo(args: argparse.Namespace) -> int:
    from localcluster.demo import run

    return run(keep=args.keep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localcluster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="run the local cluster in the foreground until Ctrl-C")
    up_parser.add_argument("--work-dir", help="folder for the cluster's state (default: a new temporary folder)")
    up_parser.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu the node advertises (default 0)")
    up_parser.add_argument("--no-operator", action="store_true", help="do not start the operator")
    up_parser.add_argument("--no-mlflow", action="store_true", help="do not start the MLflow tracking server")
    up_parser.set_defaults(run=up)
    demo_parser = commands.add_parser("demo", help="fine-tune examples/tiny-cpu.yaml end to end")
    demo_parser.add_argument("--keep", action="store_true", help="keep the cluster's work folder afterwards")
    demo_parser.set_defaults(run=demo)
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
