"""The operator's mirrored constants agree with the trainer and the CRD; importing it never pulls in torch."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import yaml

from finetune_operator import constants as c
from finetune_trainer import exit_codes, launch, node_log

ROOT = pathlib.Path(__file__).parents[2]


def test_exit_codes_mirror_the_trainer() -> None:
    assert (c.EXIT_SUCCESS, c.EXIT_FAILURE, c.EXIT_INVALID, c.EXIT_PREEMPTED) == (
        exit_codes.SUCCESS, exit_codes.FAILURE, exit_codes.INVALID, exit_codes.PREEMPTED)


def test_the_verification_failure_prefix_mirrors_the_trainer() -> None:
    from finetune_trainer import verify

    assert c.MODEL_VERIFICATION_FAILED == verify.FAILED_PREFIX


def test_the_crd_documents_the_model_verified_condition() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "finetune.dev_finetunejobs.yaml").read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert c.CONDITION_MODEL_VERIFIED in status["properties"]["conditions"]["description"]


def _env_rule() -> str:
    crd = yaml.safe_load((ROOT / "crds" / "finetune.dev_finetunejobs.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = spec["properties"]["env"]["items"]["x-kubernetes-validations"]
    return next(r["rule"] for r in rules if "startsWith" in r["rule"])


def test_reserved_env_names_match_the_crd_rule() -> None:
    rule = _env_rule()
    names = re.search(r"self\.name in \[(.*?)\]", rule)
    assert names is not None
    assert tuple(re.findall(r"'([A-Z_]+)'", names.group(1))) == c.RESERVED_ENV_NAMES
    assert tuple(re.findall(r"startsWith\('([A-Z_]+)'\)", rule)) == c.RESERVED_ENV_PREFIXES


def test_every_injected_env_name_is_reserved() -> None:
    injected = [c.ENV_NNODES, c.ENV_NODE_RANK, c.ENV_NPROC_PER_NODE, c.ENV_MASTER_ADDR, c.ENV_MASTER_PORT,
                c.ENV_OMP_NUM_THREADS, c.ENV_CONFIG, c.ENV_ATTEMPT, c.ENV_AWS_ACCESS_KEY_ID,
                c.ENV_AWS_SECRET_ACCESS_KEY]
    for name in injected:
        assert name in c.RESERVED_ENV_NAMES or name.startswith(c.RESERVED_ENV_PREFIXES), name


def test_the_trainer_reads_the_env_names_the_operator_sets() -> None:
    assert (launch.CONFIG_ENV, node_log.ATTEMPT_ENV, node_log.NODE_RANK_ENV) == (
        c.ENV_CONFIG, c.ENV_ATTEMPT, c.ENV_NODE_RANK)


def test_phases_match_the_crd_enum() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "finetune.dev_finetunejobs.yaml").read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert tuple(status["properties"]["phase"]["enum"]) == c.PHASES


def test_importing_the_operator_does_not_import_torch_or_the_trainer() -> None:
    code = (
        "import sys, finetune_operator.__main__, finetune_operator.handlers, finetune_operator.decide; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'finetune_trainer', 'transformers')); "
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == ""


def test_the_operator_process_runs_kopf_without_the_kubernetes_client() -> None:
    # kopf probes for the kubernetes client at import; the operator hides it (about 50 MB of generated models) and
    # a kubeconfig with an exec plugin can still import it afterwards.
    code = (
        "import sys; from finetune_operator.kopf_import import import_kopf; kopf = import_kopf(); "
        "import finetune_operator.handlers; print('kubernetes' in sys.modules, kopf.adopt is not None); "
        "import kubernetes.config; print('kubernetes.config' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == ["False", "True", "True"]
