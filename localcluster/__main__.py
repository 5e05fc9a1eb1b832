"""Command line of the local cluster: ``python -m localcluster up`` (foreground) and ``python -m localcluster demo``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def up(args: argparse.Namespace) -> int:
    from localcluster.cluster import CREDENTIALS_SECRET, LocalCluster

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="localcluster-"))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalCluster(work_dir, gpus=args.gpus, with_operator=not args.no_operator) as cluster:
        print(f"kubeconfig:   {cluster.kubeconfig}    (export KUBECONFIG={cluster.kubeconfig})")
        version = cluster.control_plane.version if cluster.control_plane else "?"
        print(f"API server:   {cluster.url} (Kubernetes {version}; the operator runs as {cluster.operator_identity})")
        print(f"S3 endpoint:  {cluster.s3.endpoint_url}  (credentials in Secret default/{CREDENTIALS_SECRET})")
        if cluster.prometheus:
            print(f"Prometheus:   {cluster.prometheus.url}")
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
    up_parser.set_defaults(run=up)
    demo_parser = commands.add_parser("demo", help="fine-tune examples/tiny-cpu.yaml end to end")
    demo_parser.add_argument("--keep", action="store_true", help="keep the cluster's work folder afterwards")
    demo_parser.set_defaults(run=demo)
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
