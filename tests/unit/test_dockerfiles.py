"""The images' invariants, read from Dockerfile.operator and Dockerfile.trainer (no Docker engine here to build)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from finetune_operator import constants

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "Dockerfile.operator"
TRAINER = ROOT / "Dockerfile.trainer"
PINNED = re.compile(r"^[a-z0-9][\w.\-/]*(:[\w.\-]+)?@sha256:[0-9a-f]{64}$")
SECRET_NAME = re.compile(r"^AWS_|(^|_)TOKEN$|PASSWORD|SECRET|CREDENTIAL|(^|_)API_KEY$", re.IGNORECASE)


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """ENV and ARG defaults set in this stage (later ones win)."""
        values: dict[str, str] = {}
        for instruction in self.instructions:
            if instruction.keyword in {"ENV", "ARG"}:
                values.update(assignments(instruction))
        return values


def assignments(instruction: Instruction) -> dict[str, str]:
    """NAME=value pairs of an ENV or ARG (also the legacy `ENV NAME value` form; an ARG without default is "")."""
    words = shlex.split(instruction.args, posix=True)
    if instruction.keyword == "ENV" and words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return {w.split("=", 1)[0]: (w.split("=", 1)[1] if "=" in w else "") for w in words}


def parse_dockerfile(text: str) -> tuple[list[Instruction], list[Stage]]:
    """Global instructions (ARGs before the first FROM) and the stages, with continuation lines joined."""
    logical: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical.append((start, " ".join(part for part in pending if part)))
        pending = []
    assert not pending, "the file ends inside a continued instruction"

    preamble: list[Instruction] = []
    stages: list[Stage] = []
    for number, line in logical:
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), number)
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append(instruction)
        else:
            preamble.append(instruction)
    return preamble, stages


# ---- checks shared by both images; each returns the problems it finds ---------------------------------------------


def unpinned_bases(stages: list[Stage]) -> list[str]:
    names: set[str] = set()
    problems = []
    for stage in stages:
        if stage.base not in names and not PINNED.match(stage.base):
            problems.append(f"FROM {stage.base} is not pinned by digest")
        if stage.name:
            names.add(stage.name)
    return problems


def root_final_user(stages: list[Stage]) -> list[str]:
    users = stages[-1].all("USER")
    if not users:
        return ["the final stage sets no USER: the image runs as root"]
    user = users[-1].args.split(":")[0]
    if user in {"root", "0"}:
        return [f"the final stage runs as {user}"]
    if not user.isdigit():
        return [f"USER {user} is not numeric: Kubernetes' runAsNonRoot cannot verify it"]
    return []


def secret_settings(preamble: list[Instruction], stages: list[Stage]) -> list[str]:
    instructions = preamble + [i for stage in stages for i in stage.instructions]
    return [
        f"line {i.line}: {i.keyword} {name} looks like a secret baked into the image"
        for i in instructions if i.keyword in {"ARG", "ENV"}
        for name in assignments(i) if SECRET_NAME.search(name)
    ]


def pip_installs(stages: list[Stage]) -> list[str]:
    return [i.args for stage in stages for i in stage.all("RUN") if "pip install" in i.args]


def installed_extras(command: str) -> set[str]:
    return {extra.strip() for group in re.findall(r"\.\[([\w,\s-]+)\]", command) for extra in group.split(",")}


def entrypoint(stages: list[Stage]) -> list[str]:
    entrypoints = stages[-1].all("ENTRYPOINT")
    assert entrypoints, "the final stage has no ENTRYPOINT"
    value = json.loads(entrypoints[-1].args)  # exec form: PID 1 is Python, so SIGTERM reaches it
    assert isinstance(value, list)
    return value


def copy_sources(stages: list[Stage]) -> list[str]:
    sources = []
    for stage in stages:
        for instruction in stage.all("COPY"):
            words = instruction.args.split()
            if any(w.startswith("--from") for w in words):
                continue
            sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


def load(path: Path) -> tuple[list[Instruction], list[Stage]]:
    return parse_dockerfile(path.read_text())


# ---- the checks on the two real Dockerfiles ---------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", [OPERATOR, TRAINER], ids=lambda p: p.name)
def test_should_pin_every_base_run_as_non_root_and_bake_in_no_secret(dockerfile: Path) -> None:
    preamble, stages = load(dockerfile)
    assert len(stages) >= 2, "multi-stage: build tools stay out of the final image"
    assert unpinned_bases(stages) == []
    assert root_final_user(stages) == []
    assert secret_settings(preamble, stages) == []
    assert stages[-1].all("COPY"), "the final stage copies the built virtualenv"
    assert any("--from=build" in i.args for i in stages[-1].all("COPY"))
    # Nothing is fetched with curl/wget | sh, and no pip cache ends up in a layer.
    text = dockerfile.read_text()
    assert not re.search(r"(curl|wget)[^\n]*\|\s*(ba)?sh", text)
    for command in pip_installs(stages):
        stage_env = next(s.env() for s in stages if any(i.args == command for i in s.all("RUN")))
        assert "--no-cache-dir" in command or stage_env.get("PIP_NO_CACHE_DIR") == "1", command


def test_operator_image_should_install_only_the_operator_extra_and_never_torch() -> None:
    _, stages = load(OPERATOR)
    assert all(s.base.startswith("python:3.11-slim") for s in stages if s.base not in {t.name for t in stages})
    installs = pip_installs(stages)
    assert installs, "the operator image installs the project"
    assert set().union(*(installed_extras(c) for c in installs)) == {"operator"}
    for stage in stages:
        for instruction in stage.instructions:
            assert not re.search(r"\b(torch|deepspeed|transformers|trainer|localcluster)\b", instruction.args,
                                 re.IGNORECASE) or instruction.keyword == "LABEL", f"line {instruction.line}"
    assert not any(src.rstrip("/") in {"trainer", "localcluster", "."} for src in copy_sources(stages))
    # No compiler or package manager run in the final image: it stays the slim base plus a virtualenv.
    assert not stages[-1].all("RUN")
    assert entrypoint(stages) == ["python", "-m", "finetune_operator"]


def test_operator_extra_should_not_pull_in_torch() -> None:
    """The operator extra itself (what the image installs) has no ML stack."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~\[ ;]", requirement)[0].lower() for requirement in extras["operator"]}
    assert "kopf" in names
    assert not names & {"torch", "deepspeed", "transformers", "accelerate", "peft"}


def test_trainer_image_should_prebuild_deepspeed_ops_on_a_cuda_pytorch_base() -> None:
    _, stages = load(TRAINER)
    build = next(s for s in stages if any(".[trainer]" in i.args for i in s.all("RUN")))
    final = stages[-1]
    assert re.match(r"^pytorch/pytorch:[\d.]+-cuda12\.\d+-cudnn9-devel@", build.base), build.base
    # The final image has the same PyTorch and CUDA, without the compiler toolchain.
    assert final.base.split("@")[0] == build.base.split("@")[0].replace("-devel", "-runtime")

    env = build.env()
    assert env.get("DS_BUILD_OPS") == "1" or (env.get("DS_BUILD_CPU_ADAM") == "1" and env.get("DS_BUILD_FUSED_ADAM")
                                               == "1"), "DeepSpeed ops are not compiled at build time"
    arch_list = env.get("TORCH_CUDA_ARCH_LIST", "")
    assert re.fullmatch(r"\d\.\d(\+PTX)?(;\d\.\d(\+PTX)?)*", arch_list), arch_list
    assert "9.0" in arch_list and "8.0" in arch_list  # H100 and A100
    install = next(c for c in pip_installs([build]) if ".[trainer]" in c)
    assert "--no-build-isolation" in install, "DeepSpeed must compile against the image's CUDA torch"
    assert any("ds_report" in i.args for i in build.all("RUN")), "the build shows which ops got compiled"


def test_trainer_image_should_use_the_pinned_torch_release_and_never_the_cpu_wheel() -> None:
    _, stages = load(TRAINER)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (torch_pin,) = [r for r in pyproject["project"]["optional-dependencies"]["trainer"] if r.startswith("torch==")]
    version = torch_pin.removeprefix("torch==")
    for stage in stages:
        assert stage.base.startswith(f"pytorch/pytorch:{version}-"), f"{stage.base} is not torch {version}"
    # constraints.txt pins the CPU wheel for CPU-only machines; the image must not install from it as it is.
    if re.search(r"^torch==\S+\+cpu", (ROOT / "constraints.txt").read_text(), re.MULTILINE):
        for command in pip_installs(stages):
            words = shlex.split(command)
            constraint_files = [words[i + 1] for i, w in enumerate(words) if w in {"-c", "--constraint"}]
            assert "constraints.txt" not in constraint_files, command


def test_trainer_image_should_run_offline_as_non_root_under_the_launcher() -> None:
    _, stages = load(TRAINER)
    # The pods the operator builds run as this uid; the image's own user and HOME agree with it.
    assert stages[-1].all("USER")[-1].args == f"{constants.RUN_AS_USER}:{constants.RUN_AS_USER}"
    assert list(constants.TRAINER_COMMAND) == entrypoint(stages)
    final_env = stages[-1].env()
    assert final_env.get("HF_HUB_OFFLINE") == "1"
    assert final_env.get("TRANSFORMERS_OFFLINE") == "1"
    assert entrypoint(stages) == ["python", "-m", "finetune_trainer.launch"]
    assert not {src.rstrip("/") for src in copy_sources(stages)} & {"operator", "localcluster", "."}


# ---- .dockerignore --------------------------------------------------------------------------------------------


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last matching pattern wins, `!` re-includes)."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        candidates = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch.fnmatchcase(prefix, c) for prefix in prefixes for c in candidates) or any(
            fnmatch.fnmatchcase(part, pattern.removeprefix("**/")) for part in parts if pattern.startswith("**/")
        ):
            excluded = not negate
    return excluded


def test_dockerignore_should_send_what_the_dockerfiles_copy_and_nothing_private() -> None:
    for dockerfile in (OPERATOR, TRAINER):
        for source in copy_sources(load(dockerfile)[1]):
            inside = f"{source.rstrip('/')}/x.py" if source.endswith("/") else source
            assert not dockerignore_excludes(inside), f"{dockerfile.name} copies {source}, which is ignored"
    for private in [".git/config", ".venv/bin/python", ".cache/tools/helm", ".env", "tests/unit/test_chart.py",
                    "localcluster/__init__.py", "operator/finetune_operator/__pycache__/x.pyc",
                    "secrets/aws-credentials", "id_rsa", "examples/data/customer-support.jsonl"]:
        assert dockerignore_excludes(private), private


# ---- the checks can fail --------------------------------------------------------------------------------------

GOOD = """\
FROM python:3.11-slim@sha256:{digest} AS build
RUN pip install --no-cache-dir ".[operator]"
FROM python:3.11-slim@sha256:{digest}
COPY --from=build /opt/venv /opt/venv
USER 10001
ENTRYPOINT ["python", "-m", "finetune_operator"]
""".replace("{digest}", "0" * 64)


@pytest.mark.parametrize(
    ("mutation", "check"),
    [
        (lambda t: t.replace("@sha256:" + "0" * 64 + " AS", " AS"), "unpinned"),
        (lambda t: t.replace("FROM python:3.11-slim@sha256:" + "0" * 64 + "\n", "FROM python:3.11-slim:latest\n"),
         "unpinned"),
        (lambda t: t.replace("USER 10001", "USER root"), "user"),
        (lambda t: t.replace("USER 10001", "USER 0:0"), "user"),
        (lambda t: t.replace("USER 10001\n", ""), "user"),
        (lambda t: t.replace("USER 10001", "USER app"), "user"),
        (lambda t: t.replace("USER 10001", "USER 10001\nENV AWS_SECRET_ACCESS_KEY=abc"), "secret"),
        (lambda t: t.replace("USER 10001", "ARG HF_TOKEN"), "secret"),
        (lambda t: t.replace("USER 10001", "ENV DB_PASSWORD hunter2"), "secret"),
    ],
)
def test_checks_should_catch_a_bad_dockerfile(mutation: object, check: str) -> None:
    preamble, stages = parse_dockerfile(GOOD)
    assert unpinned_bases(stages) == root_final_user(stages) == secret_settings(preamble, stages) == []
    assert callable(mutation)
    preamble, stages = parse_dockerfile(mutation(GOOD))
    found = {"unpinned": unpinned_bases, "user": root_final_user}.get(check)
    problems = found(stages) if found else secret_settings(preamble, stages)
    assert problems


def test_parser_should_join_continuations_and_see_extras() -> None:
    _, stages = parse_dockerfile(GOOD.replace('RUN pip install --no-cache-dir ".[operator]"',
                                              'RUN pip install \\\n  # a comment\n  ".[operator,trainer]"'))
    (command,) = pip_installs(stages)
    assert installed_extras(command) == {"operator", "trainer"}
