"""The ``ftj`` command (also ``kubectl ftj``): run, watch and read FineTuneJobs from a terminal.

Exit codes: 0 the job Succeeded (or the command did what it was asked), 1 the job Failed, 2 a usage error, a bad
input, something not found or no connection, 3 ``ftj wait --timeout`` gave up while the job goes on. Every error is
one line on stderr naming what was wrong; no traceback (``FTJ_DEBUG=1`` shows one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from finetune_client import cli_run, plot
from finetune_client.client import Client
from finetune_client.errors import ClientError
from finetune_client.job_view import Job
from finetune_client.live_view import format_duration

SUCCEEDED, FAILED, USAGE, TIMED_OUT = 0, 1, 2, 3


class UsageError(ClientError):
    """The command line itself is wrong."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors as one line and exit code 2 (not the usage block)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    """``data`` as JSON or YAML when asked for, else ``text()``."""
    if args.output == "json":
        print(json.dumps(data, indent=2, default=str))
    elif args.output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False), end="")
    else:
        print(text())


def phase_code(job: Job) -> int:
    return SUCCEEDED if job.phase == "Succeeded" else FAILED if job.phase == "Failed" else SUCCEEDED


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def table(jobs: list[Job]) -> str:
    rows = [("NAME", "PHASE", "PROGRESS", "LOSS", "EVAL LOSS", "ETA", "RESTARTS")]
    for job in jobs:
        rows.append((job.name, job.phase, f"{job.step}/{job.total_steps or '?'}", _loss(job.loss),
                     _loss(job.eval_loss), format_duration(job.eta_seconds), str(job.restarts)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def command_ls(client: Client, args: argparse.Namespace) -> int:
    jobs = client.list()
    empty = f"no FineTuneJobs in {client.namespace}"
    emit(args, [job.summary() for job in jobs], lambda: table(jobs) if jobs else empty)
    return 0


def status_text(job: Job, events: list[dict[str, Any]]) -> str:
    status = job.status
    lines = [table([job]), ""]
    lines += [f"condition  {c.get('type')}={c.get('status')}  {c.get('reason', '')}: {c.get('message', '')}"
              for c in job.conditions]
    lines.append(f"attempt    {job.attempt} ({job.restarts} restarts, {status.get('countedFailures', 0)} counted "
                 "failures)")
    for key in ("latestCheckpoint", "bestCheckpoint"):
        if status.get(key):
            lines.append(f"{key:<10} step {status[key].get('step')}  {status[key].get('uri')}")
    lines.append(f"model      {job.model_uri}")
    tracking = status.get("tracking") or {}
    if tracking.get("url"):
        reachable = "" if tracking.get("reachable", True) else "  (tracking server not answering)"
        lines.append(f"tracking   {tracking['url']}{reachable}")
    if job.message:
        lines.append(f"message    {job.message}")
    lines += [f"event      {e['time']}  {e['type']} {e['reason']}: {e['message']}" for e in events[-10:]]
    return "\n".join(lines)


def command_status(client: Client, args: argparse.Namespace) -> int:
    job = client.get(args.name)
    events = client.events(args.name)
    data = {**job.summary(), "conditions": job.conditions, "latestCheckpoint": job.status.get("latestCheckpoint"),
            "bestCheckpoint": job.status.get("bestCheckpoint"), "model": job.model_uri,
            "tracking": job.status.get("tracking"), "events": events}
    emit(args, data, lambda: status_text(job, events))
    return 0


def command_logs(client: Client, args: argparse.Namespace) -> int:
    for line in client.logs(args.name, rank=args.rank, attempt=args.attempt, follow=args.follow):
        print(line, flush=args.follow)
    return 0


def follow_and_report(client: Client, args: argparse.Namespace, name: str) -> int:
    """The live view (or a plain wait for json/yaml), then the job's summary; Ctrl-C detaches."""
    try:
        job = client.wait(name) if args.output != "text" else cli_run.follow(client, name)
    except KeyboardInterrupt:
        print(f"\ndetached: {name} keeps running (ftj status {name}, ftj wait {name})", file=sys.stderr)
        return SUCCEEDED
    emit(args, job.summary(), lambda: f"{job.name} {job.phase}" + (f": {job.message}" if job.message else ""))
    return phase_code(job)


def command_wait(client: Client, args: argparse.Namespace) -> int:
    if args.timeout is not None:
        try:
            job = client.wait(args.name, timeout=args.timeout)
        except TimeoutError as exc:
            print(f"ftj: {exc}; it keeps running (exit {TIMED_OUT})", file=sys.stderr)
            return TIMED_OUT
        emit(args, job.summary(), lambda: f"{job.name} {job.phase}")
        return phase_code(job)
    return follow_and_report(client, args, args.name)


def command_run(client: Client, args: argparse.Namespace) -> int:
    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    job = cli_run.prepare_and_apply(client, args, say)
    if args.detach:
        emit(args, job.summary(), lambda: f"{job.name} applied; ftj status {job.name} to watch it")
        return SUCCEEDED
    return follow_and_report(client, args, job.name)


def command_verb(verb: str) -> Callable[[Client, argparse.Namespace], int]:
    def run(client: Client, args: argparse.Namespace) -> int:
        getattr(client, verb)(args.name)
        print(f"finetunejob.finetune.dev/{args.name} {verb}{'d' if verb.endswith('e') else 'ed'}")
        return 0

    return run


def command_plot(client: Client, args: argparse.Namespace) -> int:
    history = client.history(args.name)
    if args.out:
        plot.save_png(history, args.out, title=f"{args.name}: loss")
        print(f"wrote {args.out}")
    else:
        print(plot.terminal_plot(history))
    return 0


def command_pull(client: Client, args: argparse.Namespace) -> int:
    """The exported model into DEST, a LoRA adapter merged into its base unless --no-merge keeps it as it is."""
    from finetune_client import chat

    dest = Path(args.dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"{dest} exists and is not an empty folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Beside DEST, so the finished folder is renamed into place rather than copied.
    with tempfile.TemporaryDirectory(prefix=".ftj-pull-", dir=dest.parent) as work:
        exported = client.download_model(args.name, Path(work) / "export")
        adapter = (exported / "adapter_config.json").is_file()
        if adapter and not args.no_merge:
            chat.save_merged(exported, lambda: base_model(client, args.name, Path(work)), dest)
            print(f"downloaded the adapter of {args.name} and merged it into its base model in {dest}")
            return 0
        if dest.exists():
            dest.rmdir()
        exported.rename(dest)
    print(f"downloaded the {'adapter' if adapter else 'model'} of {args.name} to {dest}")
    return 0


def base_model(client: Client, name: str, work: Path) -> Path:
    """The job's base model, for merging an adapter: its file:// folder, or downloaded from S3."""
    job = client.get(name)
    uri = str(job.spec["model"]["uri"])
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    client.storage_for(job).download_prefix(uri, work / "base")
    return work / "base"


def command_chat(client: Client, args: argparse.Namespace) -> int:
    from finetune_client import chat

    with tempfile.TemporaryDirectory(prefix="ftj-chat-") as work:
        job = client.get(args.name)
        exported = client.download_model(args.name, Path(work) / "export")
        model, tokenizer = chat.load_model(exported, lambda: base_model(client, args.name, Path(work)))
        settings = chat.adapter_settings(exported) if chat.is_adapter(exported) else None
    if settings is not None:
        loaded = f"LoRA adapter {job.model_uri} ({settings}) merged onto base model {job.spec['model']['uri']}"
    else:
        loaded = f"model {job.model_uri}"
    print(f"{args.name}: {loaded}, {model.num_parameters()} parameters", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        print(chat.answer(model, tokenizer, [*system, {"role": "user", "content": args.prompt}], args.max_new_tokens))
        return 0
    conversation = list(system)
    print(f"chatting with {args.name} (an empty line or Ctrl-D ends)", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        conversation.append({"role": "user", "content": line.strip()})
        reply = chat.answer(model, tokenizer, conversation, args.max_new_tokens)
        conversation.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
    return 0


def build_parser() -> OneLineParser:
    prog = "kubectl ftj" if Path(sys.argv[0]).name == "kubectl-ftj" else "ftj"
    common = OneLineParser(add_help=False)
    # SUPPRESS: an option given before the command is not reset by the command's parser.
    common.add_argument("-n", "--namespace", default=argparse.SUPPRESS, help="namespace (default: the kubeconfig's)")
    common.add_argument("--kubeconfig", default=argparse.SUPPRESS, help="kubeconfig file (default $KUBECONFIG)")
    common.add_argument("--context", default=argparse.SUPPRESS, help="kubeconfig context")
    common.add_argument("--output", choices=("text", "json", "yaml"), default=argparse.SUPPRESS,
                        help="output format for scripts (default text)")
    parser = OneLineParser(prog=prog, parents=[common], description="Run, watch and read FineTuneJobs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    def add(name: str, run: Callable[[Client, argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    cli_run.add_run_arguments(add("run", command_run, "create or update a job, upload local inputs, follow it"))
    add("ls", command_ls, "list the namespace's jobs")
    add("status", command_status, "a job's progress, conditions, attempts, checkpoints and events").add_argument("name")
    logs = add("logs", command_logs, "a node's log, across gang restarts and after the job's pods are gone")
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing as the job runs")
    logs.add_argument("--rank", type=int, default=0, help="node rank (default 0)")
    logs.add_argument("--attempt", type=int, help="attempt (default: the latest, then with -f the next ones)")
    wait = add("wait", command_wait, "follow a job until it finishes; exit 0 Succeeded, 1 Failed")
    wait.add_argument("name")
    wait.add_argument("--timeout", type=float,
                      help=f"give up after this many seconds with exit {TIMED_OUT} (no live view)")
    for verb in ("suspend", "resume", "delete"):
        add(verb, command_verb(verb), f"{verb} a job").add_argument("name")
    plotting = add("plot", command_plot, "train and eval loss against step (PNG with -o, else in the terminal)")
    plotting.add_argument("name")
    plotting.add_argument("-o", "--out", type=Path, help="write a PNG here")
    pull = add("pull", command_pull, "download the exported model")
    pull.add_argument("name")
    pull.add_argument("dest")
    pull.add_argument("--no-merge", action="store_true",
                      help="keep a LoRA adapter as it is (by default it is merged into its base model)")
    chatting = add("chat", command_chat, "answer prompts with the fine-tuned model (uses its chat template)")
    chatting.add_argument("name")
    chatting.add_argument("--prompt", help="answer this one prompt and exit (default: read prompts from stdin)")
    chatting.add_argument("--system", help="a system message before the prompts")
    chatting.add_argument("--max-new-tokens", type=int, default=128)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        for key, default in (("namespace", None), ("kubeconfig", None), ("context", None), ("output", "text")):
            if not hasattr(args, key):
                setattr(args, key, default)
        client = Client(namespace=args.namespace, kubeconfig=args.kubeconfig, context=args.context)
        code: int = args.run(client, args)
        return code
    except ClientError as exc:
        print(f"ftj: {exc}", file=sys.stderr)
        return USAGE
    except (TimeoutError, OSError) as exc:
        print(f"ftj: {exc}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        print("ftj: interrupted", file=sys.stderr)
        return USAGE
    except Exception as exc:  # one line for the user; FTJ_DEBUG=1 for the whole story
        if os.environ.get("FTJ_DEBUG"):
            raise
        print(f"ftj: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return USAGE
