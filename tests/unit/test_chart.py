"""The Helm chart charts/finetune-operator: what it renders for each value set, validated like an API server would.

Monitoring (ServiceMonitor, PodMonitor, alerts, dashboard) is tested in test_chart_monitoring.py."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_render import (
    CHART,
    CRD_API_GROUPS,
    FULLNAME,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    ROOT,
    SCENARIOS,
    Doc,
    env_of,
    of_kind,
    one,
    operator_container,
    render,
    template,
)

from finetune_operator import constants
from finetune_operator.settings import load_settings


def rule_set(role: Doc) -> set[tuple[str, str, str]]:
    """RBAC rules flattened to (apiGroup, resource, verb) triples."""
    triples = set()
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule fields: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    triples.add((group, resource, verb))
    return triples


def triples(group: str, resources: list[str], verbs: list[str]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for resource in resources for verb in verbs}


# What every watched namespace needs (the operator's contract), and the cluster-scoped extras.
NAMESPACED_RULES = (
    triples("finetune.dev", ["finetunejobs"], ["get", "list", "watch", "delete"])
    | triples("finetune.dev", ["finetunejobs/status"], ["patch"])
    | triples("finetune.dev", ["finetunejobs/finalizers"], ["update"])
    | triples("", ["pods"], ["get", "list", "watch", "create", "delete"])
    | triples("", ["services"], ["get", "create"])
    | triples("", ["configmaps"], ["get", "create", "patch"])
    | triples("", ["events"], ["create", "list"])
)
CRD_RULES = triples("apiextensions.k8s.io", ["customresourcedefinitions"], ["list", "watch"])
# kopf watching named namespaces lists and watches namespaces too.
NAMESPACE_SCAN_RULES = triples("", ["namespaces"], ["list", "watch"])
CLUSTER_PEERING_RULES = triples("kopf.dev", ["clusterkopfpeerings"], ["get", "list", "watch", "patch"])
NAMESPACED_PEERING_RULES = triples("kopf.dev", ["kopfpeerings"], ["get", "list", "watch", "patch"])

# ---- lint, schema, values documentation ---------------------------------------------------------------------------


def test_should_pass_helm_lint_with_defaults_and_with_everything_on(helm_bin: Path) -> None:
    for args in ([], SCENARIOS["everything on"]):
        proc = subprocess.run([str(helm_bin), "lint", "--strict", str(CHART), *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--set", "replicaCont=2"], "replicaCont"),
        (["--set", "networkPolicy.enabeld=true"], "enabeld"),
        (["--set", "podMonitor.intervall=30s"], "intervall"),
        (["--set", "securityContext.readOnlyRootFileSystem=false"], "readOnlyRootFileSystem"),
        (["--set", "affinity.nodeAfinity.x=y"], "nodeAfinity"),
        (["--set", "rbac.scope=Cluster"], "rbac.scope"),
        (["--set", "image.digest=latest"], "image.digest"),
    ],
)
def test_should_reject_values_when_a_key_is_misspelt_or_a_value_invalid(
    helm_bin: Path, args: list[str], named: str
) -> None:
    rc, _, err = template(helm_bin, tuple(args))
    assert rc != 0
    assert named in err, err


# Values that are free-form maps (labels, resource lists): their keys are data, not schema keys.
FREE_MAPS = {"networkPolicy.dns.podLabels", "resources.requests", "resources.limits"}


def _value_paths(node: Any, prefix: str = "") -> set[str]:
    paths = set()
    if isinstance(node, dict) and prefix not in FREE_MAPS:
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            paths.add(path)
            paths |= _value_paths(value, path)
    return paths


def _schema_paths(schema: dict[str, Any], definitions: dict[str, Any], prefix: str = "") -> set[str]:
    if "$ref" in schema:
        schema = definitions[schema["$ref"].rsplit("/", 1)[1]]
    paths = set()
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}.{key}" if prefix else key
        paths.add(path)
        paths |= _schema_paths(sub, definitions, path)
    return paths


def test_should_type_every_value_in_the_schema_and_document_every_schema_key_in_values() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(values)
    value_paths = _value_paths(values)
    schema_paths = _schema_paths(schema, schema["definitions"])
    assert value_paths - schema_paths == set(), "values without a schema entry"
    # Every schema key has a default in values.yaml, except optional security-context and affinity fields.
    optional = re.compile(r"^(podSecurityContext|securityContext|affinity|resources)\.")
    assert {p for p in schema_paths - value_paths if not optional.match(p)} == set(), "schema keys not in values"


def _objects_without_closed_properties(schema: Any, path: str = "$") -> list[str]:
    """Paths of object schemas that would silently accept a misspelt key."""
    found = []
    if isinstance(schema, dict):
        is_object = schema.get("type") == "object"
        if is_object and "properties" in schema and schema.get("additionalProperties") is not False:
            found.append(path)
        if is_object and "properties" not in schema and "additionalProperties" not in schema:
            found.append(path)
        for key, sub in schema.items():
            found += _objects_without_closed_properties(sub, f"{path}.{key}")
    elif isinstance(schema, list):
        for index, sub in enumerate(schema):
            found += _objects_without_closed_properties(sub, f"{path}[{index}]")
    return found


def test_should_close_every_object_in_the_schema_with_additional_properties_false() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert _objects_without_closed_properties(schema) == []
    # The only open objects are Kubernetes affinity terms, passed through to the pod spec as they are.
    open_objects = re.findall(r'"(\w+)": \{\s*"type": "object",\s*"additionalProperties": true',
                              (CHART / "values.schema.json").read_text())
    assert sorted(open_objects) == ["nodeAffinity", "podAffinity", "podAntiAffinity"]


def test_should_describe_every_value_with_a_comment_above_it() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = [
        f"{number}: {line}"
        for number, line in enumerate(lines, start=1)
        if re.match(r"^\s*[\w.-]+:", line) and not lines[number - 2].strip().startswith("#")
    ]
    assert undocumented == []


# ---- CRDs -----------------------------------------------------------------------------------------------------


def test_should_ship_the_finetunejob_crd_byte_identical_to_the_top_level_one() -> None:
    assert (CHART / "crds" / "finetune.dev_finetunejobs.yaml").read_bytes() == (
        ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
    ).read_bytes(), "copy crds/finetune.dev_finetunejobs.yaml to charts/finetune-operator/crds/"


def test_should_ship_kopf_peering_crds_for_replicas_to_coordinate() -> None:
    docs = [doc for doc in yaml.safe_load_all((CHART / "crds" / "kopf.dev_peerings.yaml").read_text()) if doc]
    by_name = {doc["metadata"]["name"]: doc["spec"] for doc in docs}
    assert set(by_name) == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    assert by_name["clusterkopfpeerings.kopf.dev"]["scope"] == "Cluster"
    assert by_name["kopfpeerings.kopf.dev"]["scope"] == "Namespaced"
    for spec in by_name.values():
        assert spec["group"] == "kopf.dev"
        assert [v["name"] for v in spec["versions"] if v["served"] and v["storage"]] == ["v1"]


# ---- validation against the Kubernetes API schemas --------------------------------------------------------------


def _validate(doc: Doc) -> None:
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_should_render_only_objects_valid_for_kubernetes_when_scenario_is_set(helm_bin: Path, scenario: str) -> None:
    docs = render(helm_bin, *SCENARIOS[scenario])
    validated = skipped = 0
    for doc in docs:
        if doc["apiVersion"].split("/")[0] in CRD_API_GROUPS:
            skipped += 1  # ServiceMonitor, PodMonitor, PrometheusRule, kopf peerings: no built-in schema
            continue
        try:
            _validate(doc)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {error.message} at {list(error.path)}")
        validated += 1
        if doc["kind"] not in {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}:
            assert doc["metadata"].get("namespace"), f"{doc['kind']} without a namespace"
    assert validated >= 6
    if scenario == "monitoring on":
        assert skipped == 3


def test_should_validate_the_chart_crds_as_kubernetes_objects() -> None:
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                _validate(doc)


def test_validation_should_catch_a_misspelt_field(helm_bin: Path) -> None:
    """The validator is live: the same Deployment with one misspelt field is rejected."""
    deployment = copy.deepcopy(one(render(helm_bin), "Deployment"))
    _validate(deployment)
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)


# ---- the operator Deployment ------------------------------------------------------------------------------------


def test_should_run_one_standalone_operator_with_restricted_security_by_default(helm_bin: Path) -> None:
    docs = render(helm_bin)
    assert sorted(doc["kind"] for doc in docs) == [
        "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "Service", "ServiceAccount",
    ]
    deployment = one(docs, "Deployment")
    assert deployment["metadata"]["namespace"] == NAMESPACE
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}, "two standalone operators must never overlap"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = operator_container(docs)
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["image"] == "ghcr.io/finetunejob/finetune-operator:0.1.0"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # A read-only root filesystem still gets a writable /tmp.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {v["name"] for v in pod["volumes"]} == {"tmp"}
    env = env_of(docs)
    assert env == {
        "FINETUNE_NAMESPACES": "",
        "FINETUNE_TRAINER_IMAGE": "ghcr.io/finetunejob/finetune-trainer:0.1.0",
        "FINETUNE_METRICS_PORT": "8080",
        "FINETUNE_HEALTH_PORT": "8081",
        "FINETUNE_RESYNC_SECONDS": "5",
        "FINETUNE_LOG_LEVEL": "INFO",
    }
    # The operator reads these variables into the settings the chart meant.
    settings = load_settings([], environ=env)
    assert settings.clusterwide and settings.peering is None
    assert (settings.metrics_port, settings.health_port) == (8080, 8081)
    assert settings.trainer_image == env["FINETUNE_TRAINER_IMAGE"]
    assert (settings.resync_seconds, settings.log_level) == (5, "INFO")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": constants.DEFAULT_METRICS_PORT, "health": constants.DEFAULT_HEALTH_PORT}
    probe = container["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    assert probe["periodSeconds"] > 0 and probe["failureThreshold"] > 0


def test_should_move_both_ports_when_metrics_and_health_ports_are_set(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set", "metrics.port=9090", "--set", "operator.healthPort=9091")
    env = env_of(docs)
    assert (env["FINETUNE_METRICS_PORT"], env["FINETUNE_HEALTH_PORT"]) == ("9090", "9091")
    assert {p["name"]: p["containerPort"] for p in operator_container(docs)["ports"]} == {
        "metrics": 9090, "health": 9091}


def test_should_pull_by_digest_when_image_digests_are_set(helm_bin: Path) -> None:
    operator_digest = "sha256:" + "a" * 64
    trainer_digest = "sha256:" + "b" * 64
    docs = render(helm_bin, "--set", f"image.digest={operator_digest}",
                  "--set", f"trainer.image.digest={trainer_digest}",
                  "--set", "image.repository=registry.example.com/ftj/operator")
    assert operator_container(docs)["image"] == f"registry.example.com/ftj/operator@{operator_digest}"
    assert env_of(docs)["FINETUNE_TRAINER_IMAGE"] == f"ghcr.io/finetunejob/finetune-trainer@{trainer_digest}"
    tagged = render(helm_bin, "--set", "image.tag=1.2.3", "--set", "trainer.image.tag=2.0.0")
    assert operator_container(tagged)["image"] == "ghcr.io/finetunejob/finetune-operator:1.2.3"
    assert env_of(tagged)["FINETUNE_TRAINER_IMAGE"] == "ghcr.io/finetunejob/finetune-trainer:2.0.0"


def test_should_pass_scheduling_and_metadata_through_when_they_are_set(helm_bin: Path) -> None:
    docs = render(helm_bin, *SCENARIOS["everything on"], "--set", "serviceAccount.name=ftj-operator")
    template = one(docs, "Deployment")["spec"]["template"]
    pod = template["spec"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "system", "effect": "NoSchedule"}]
    assert template["metadata"]["annotations"] == {"example.com/team": "ml"}
    assert template["metadata"]["labels"]["team"] == "ml"
    assert pod["serviceAccountName"] == "ftj-operator"
    assert one(docs, "ServiceAccount")["metadata"]["name"] == "ftj-operator"
    assert one(docs, "ClusterRoleBinding")["subjects"] == [
        {"kind": "ServiceAccount", "name": "ftj-operator", "namespace": NAMESPACE}]


def test_should_not_create_rbac_or_service_account_when_they_are_turned_off(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set", "rbac.create=false", "--set", "serviceAccount.create=false",
                  "--set", "serviceAccount.name=provided")
    assert {doc["kind"] for doc in docs} == {"ConfigMap", "Deployment", "Service"}
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "provided"
    rc, _, err = template(helm_bin, ("--set", "serviceAccount.create=false"))
    assert rc != 0 and "serviceAccount.name" in err


# ---- peering and RBAC -----------------------------------------------------------------------------------------


def test_should_set_peering_and_create_the_cluster_peering_when_replicas_is_3(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set", "replicaCount=3")
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    peering = one(docs, "ClusterKopfPeering")
    assert peering["apiVersion"] == "kopf.dev/v1"
    assert env_of(docs)["FINETUNE_PEERING"] == peering["metadata"]["name"] == FULLNAME
    assert load_settings([], environ=env_of(docs)).peering == FULLNAME
    assert rule_set(one(docs, "ClusterRole")) == NAMESPACED_RULES | CRD_RULES | CLUSTER_PEERING_RULES
    assert not of_kind(docs, "KopfPeering")


def test_should_use_namespaced_peerings_when_replicas_is_3_and_namespaces_are_listed(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set", "replicaCount=3", "--set", "rbac.scope=namespace",
                  "--set", "watchNamespaces={team-a,team-b}")
    peerings = of_kind(docs, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    assert {p["metadata"]["name"] for p in peerings} == {env_of(docs)["FINETUNE_PEERING"]}
    assert not of_kind(docs, "ClusterKopfPeering")
    for role in of_kind(docs, "Role"):
        assert rule_set(role) == NAMESPACED_RULES | NAMESPACED_PEERING_RULES


def test_should_run_standalone_without_peering_rights_when_replicas_is_1(helm_bin: Path) -> None:
    for args in ([], ["--set", "rbac.scope=namespace"]):
        docs = render(helm_bin, *args)
        assert "FINETUNE_PEERING" not in env_of(docs)
        assert not of_kind(docs, "ClusterKopfPeering") and not of_kind(docs, "KopfPeering")
        for role in of_kind(docs, "ClusterRole") + of_kind(docs, "Role"):
            assert not {group for group, _, _ in rule_set(role)} & {"kopf.dev"}


def test_should_grant_exactly_the_least_privilege_rules_when_rbac_scope_is_cluster(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set", "rbac.scope=cluster")
    assert not of_kind(docs, "Role") and not of_kind(docs, "RoleBinding")
    cluster_role = one(docs, "ClusterRole")
    assert rule_set(cluster_role) == NAMESPACED_RULES | CRD_RULES
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": cluster_role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert env_of(docs)["FINETUNE_NAMESPACES"] == ""


def test_should_watch_only_the_listed_namespaces_when_cluster_rbac_lists_namespaces(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set", "watchNamespaces={team-a,team-b}", "--set", "replicaCount=2")
    assert env_of(docs)["FINETUNE_NAMESPACES"] == "team-a,team-b"
    # Kopf runs in namespaced mode then: it peers through KopfPeerings; the namespaces are given by name, and
    # it reads the namespace list to start and stop its watches.
    assert rule_set(one(docs, "ClusterRole")) == (
        NAMESPACED_RULES | CRD_RULES | NAMESPACE_SCAN_RULES | NAMESPACED_PEERING_RULES)
    assert sorted(p["metadata"]["namespace"] for p in of_kind(docs, "KopfPeering")) == ["team-a", "team-b"]


def test_should_create_a_role_in_each_watched_namespace_when_rbac_scope_is_namespace(helm_bin: Path) -> None:
    docs = render(helm_bin, *SCENARIOS["namespace-scoped RBAC"])
    roles = of_kind(docs, "Role")
    bindings = of_kind(docs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for role in roles:
        assert rule_set(role) == NAMESPACED_RULES
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    # The one cluster-scoped grant: reading CRDs and namespaces, which kopf scans.
    assert rule_set(one(docs, "ClusterRole")) == CRD_RULES | NAMESPACE_SCAN_RULES
    assert one(docs, "ClusterRoleBinding")["roleRef"]["name"] == f"{FULLNAME}-crds"
    assert env_of(docs)["FINETUNE_NAMESPACES"] == "team-a,team-b"
    assert load_settings([], environ=env_of(docs)).namespaces == ("team-a", "team-b")


def test_should_create_no_cluster_scoped_rbac_when_namespace_scope_and_crd_access_is_off(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set", "rbac.scope=namespace", "--set", "rbac.crdAccess=false")
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    # No namespaces listed: the release namespace is the one watched.
    assert [r["metadata"]["namespace"] for r in of_kind(docs, "Role")] == [NAMESPACE]
    assert env_of(docs)["FINETUNE_NAMESPACES"] == NAMESPACE


def test_should_never_grant_wildcards_secrets_or_escalation(helm_bin: Path) -> None:
    for scenario, args in SCENARIOS.items():
        for role in [d for d in render(helm_bin, *args) if d["kind"] in {"Role", "ClusterRole"}]:
            for group, resource, verb in rule_set(role):
                assert "*" not in (group, resource, verb), scenario
                assert resource not in {"secrets", "roles", "clusterroles", "rolebindings", "clusterrolebindings"}
                assert verb not in {"escalate", "bind", "impersonate", "deletecollection"}, scenario


# ---- network policy -----------------------------------------------------------------------------------------------


def _ports(rule: Doc) -> set[tuple[Any, Any]]:
    return {(p["port"], p.get("endPort")) for p in rule.get("ports", [])}


def test_should_isolate_operator_and_trainers_when_network_policy_is_on(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set", "networkPolicy.enabled=true")
    policies = {doc["metadata"]["name"]: doc for doc in of_kind(docs, "NetworkPolicy")}
    assert set(policies) == {FULLNAME, f"{FULLNAME}-trainers"}
    operator = policies[FULLNAME]["spec"]
    trainers = policies[f"{FULLNAME}-trainers"]["spec"]
    assert policies[f"{FULLNAME}-trainers"]["metadata"]["namespace"] == NAMESPACE
    trainer_selector = {"matchLabels": {"app.kubernetes.io/name": "finetune-trainer"}}
    operator_labels = one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert operator["podSelector"] == {"matchLabels": operator_labels}
    assert trainers["podSelector"] == trainer_selector
    assert operator["policyTypes"] == trainers["policyTypes"] == ["Ingress", "Egress"]

    # Operator -> trainer metrics port, both ways round.
    to_trainers = [r for r in operator["egress"]
                   if any(p.get("podSelector") == trainer_selector for p in r.get("to", []))]
    assert len(to_trainers) == 1 and _ports(to_trainers[0]) == {(9400, None)}
    from_operator = [r for r in trainers["ingress"]
                     if any(p.get("podSelector") == {"matchLabels": operator_labels} for p in r.get("from", []))]
    assert len(from_operator) == 1 and _ports(from_operator[0]) == {(9400, None)}
    assert from_operator[0]["from"][0]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}

    # Trainer <-> trainer on the rendezvous port and the NCCL/gloo range, nothing wider.
    peer_ports = {(29500, None), (32768, 60999)}
    trainer_in = [r for r in trainers["ingress"] if r.get("from") == [{"podSelector": trainer_selector}]]
    trainer_out = [r for r in trainers["egress"] if r.get("to") == [{"podSelector": trainer_selector}]]
    assert len(trainer_in) == len(trainer_out) == 1
    assert _ports(trainer_in[0]) == _ports(trainer_out[0]) == peer_ports

    # Trainer egress: DNS and S3 only.
    egress_ports = set().union(*(_ports(r) for r in trainers["egress"]))
    assert egress_ports == peer_ports | {(53, None), (443, None)}
    s3 = [r for r in trainers["egress"] if any("ipBlock" in p for p in r.get("to", []))]
    assert len(s3) == 1 and s3[0]["to"] == [{"ipBlock": {"cidr": "0.0.0.0/0"}}] and _ports(s3[0]) == {(443, None)}
    dns = [r for r in trainers["egress"] if (53, None) in _ports(r)]
    assert {p["protocol"] for p in dns[0]["ports"]} == {"UDP", "TCP"}
    assert dns[0]["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}

    # Operator: scraped on its metrics port, probed on health, reaches the API server on 443/6443.
    assert {next(iter(_ports(r)))[0] for r in operator["ingress"]} == {"metrics", "health"}
    api = [r for r in operator["egress"] if _ports(r) == {(443, None), (6443, None)}]
    assert len(api) == 1 and "to" not in api[0]


def test_should_put_trainer_policies_in_each_watched_namespace_when_namespaces_are_listed(helm_bin: Path) -> None:
    docs = render(helm_bin, *SCENARIOS["networkPolicy on, listed namespaces"],
                  "--set", "networkPolicy.objectStorage.cidrs={10.20.0.0/16}",
                  "--set", "networkPolicy.objectStorage.ports={8333}")
    trainer_policies = [d for d in of_kind(docs, "NetworkPolicy") if d["metadata"]["name"].endswith("-trainers")]
    assert sorted(d["metadata"]["namespace"] for d in trainer_policies) == ["team-a", "team-b"]
    for policy in trainer_policies:
        s3 = [r for r in policy["spec"]["egress"] if any("ipBlock" in p for p in r.get("to", []))]
        assert s3[0]["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}] and _ports(s3[0]) == {(8333, None)}
    operator = one(docs, "NetworkPolicy", FULLNAME)["spec"]
    api = [r for r in operator["egress"] if (443, None) in _ports(r)]
    assert api[0]["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    to_trainers = [r for r in operator["egress"] if (9400, None) in _ports(r)]
    assert to_trainers[0]["to"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["team-a", "team-b"]


# ---- NOTES.txt ----------------------------------------------------------------------------------------------------


def test_should_explain_the_install_in_notes_when_replicas_and_namespaces_are_set(
    helm_bin: Path, tmp_path: Path
) -> None:
    """helm template does not render NOTES.txt, so a copy of the chart renders it into a ConfigMap."""
    chart = tmp_path / "finetune-operator"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes_under_test.tpl").write_text('{{- define "notes-under-test" -}}\n' + notes +
                                                                "\n{{- end }}\n")
    (chart / "templates" / "notes-under-test.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  notes: {{ include "notes-under-test" . | quote }}\n')
    proc = subprocess.run(
        [str(helm_bin), "template", RELEASE, str(chart), "-n", NAMESPACE,
         "--show-only", "templates/notes-under-test.yaml",
         "--set", "replicaCount=2", "--set", "watchNamespaces={team-a,team-b}"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    text = yaml.safe_load(proc.stdout)["data"]["notes"]
    assert "namespaces: team-a, team-b" in text
    assert f"2 replicas peered through KopfPeering {FULLNAME}" in text
    assert f"rollout status deployment/{FULLNAME}" in text


# ---- the docs that install the chart and size the GPU pools -------------------------------------------------------

DOCS = {name: ROOT / "docs" / name for name in ("gitops.md", "gpu-pools.md")}


def yaml_blocks(path: Path) -> list[Doc]:
    """Every object in the ```yaml blocks of a Markdown file (a block that does not parse fails the test)."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", path.read_text(), re.MULTILINE | re.DOTALL)
    assert blocks, f"no yaml blocks in {path.name}"
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]


def test_docs_should_install_the_chart_with_values_the_schema_accepts(helm_bin: Path, tmp_path: Path) -> None:
    docs = yaml_blocks(DOCS["gitops.md"])
    value_sets = [d["spec"]["source"]["helm"]["valuesObject"] for d in docs
                  if d["kind"] == "Application" and "helm" in d["spec"]["source"]]
    value_sets += [d["spec"]["values"] for d in docs if d["kind"] == "HelmRelease"]
    assert len(value_sets) == 2
    for index, values in enumerate(value_sets):
        values_file = tmp_path / f"values-{index}.yaml"
        values_file.write_text(yaml.safe_dump(values))
        rendered = render(helm_bin, "-f", str(values_file))
        assert one(rendered, "Deployment")["spec"]["replicas"] == values["replicaCount"]
    (release,) = [d for d in docs if d["kind"] == "HelmRelease"]
    assert release["spec"]["install"]["crds"] == release["spec"]["upgrade"]["crds"] == "CreateReplace"
    waves = {d["metadata"]["name"]: int(d["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])
             for d in docs if d["kind"] == "Application"}
    assert waves["finetune-crds"] < waves["finetune-operator"] < min(
        wave for name, wave in waves.items() if name.startswith("finetune-jobs"))
    crd_app = next(d for d in docs if d["kind"] == "Application" and d["metadata"]["name"] == "finetune-crds")
    assert crd_app["spec"]["source"]["path"] == "charts/finetune-operator/crds"
    assert "ServerSideApply=true" in crd_app["spec"]["syncPolicy"]["syncOptions"]


def test_docs_builtin_objects_should_be_valid() -> None:
    # The docs' FineTuneJobs go to the real API server: tests/integration/test_crd_api.py.
    checked = 0
    for path in DOCS.values():
        for doc in yaml_blocks(path):
            assert {"apiVersion", "kind"} <= set(doc), f"{path.name}: {doc}"
            if "." not in doc["apiVersion"].split("/")[0] or doc["apiVersion"].startswith("apps/"):
                _validate(doc)  # ConfigMap, Namespace: the built-in kinds
                checked += 1
    assert checked >= 3


def _pool_accepts(labels: dict[str, str], taints: list[Doc], job: Doc) -> bool:
    """Whether a node with these labels and taints can run the example job's pods."""
    selector = job["spec"].get("nodeSelector", {})
    tolerated = all(
        any(t["key"] == taint["key"] and t.get("effect", taint["effect"]) == taint["effect"]
            and (t.get("operator") == "Exists" or t.get("value") == taint.get("value"))
            for t in job["spec"].get("tolerations", []))
        for taint in taints
    )
    return tolerated and selector.items() <= labels.items()


def test_docs_gpu_pools_should_match_the_examples_selectors_and_tolerations() -> None:
    docs = yaml_blocks(DOCS["gpu-pools.md"])
    examples = {name: yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
                for name in ("lora-7b-2x8gpu", "spot")}
    gpu_taint = {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}

    node_pools = {d["metadata"]["name"]: d["spec"]["template"] for d in docs if d["kind"] == "NodePool"}

    def karpenter_labels(template: Doc) -> dict[str, str]:
        labels = dict(template.get("metadata", {}).get("labels", {}))
        for requirement in template["spec"]["requirements"]:
            if requirement["operator"] == "In" and len(requirement["values"]) == 1:
                labels[requirement["key"]] = requirement["values"][0]
        return labels

    assert all(gpu_taint in template["spec"]["taints"] for template in node_pools.values())
    assert _pool_accepts(karpenter_labels(node_pools["gpu-a100"]), node_pools["gpu-a100"]["spec"]["taints"],
                         examples["lora-7b-2x8gpu"])
    assert _pool_accepts(karpenter_labels(node_pools["gpu-spot"]), node_pools["gpu-spot"]["spec"]["taints"],
                         examples["spot"])
    assert not _pool_accepts(karpenter_labels(node_pools["gpu-a100"]), [], examples["spot"])

    (cluster,) = [d for d in docs if d["kind"] == "ClusterConfig"]
    groups = {g["name"]: g for g in cluster["managedNodeGroups"]}
    for group_name, example in (("gpu-a100", "lora-7b-2x8gpu"), ("gpu-spot", "spot")):
        group = groups[group_name]
        labels = dict(group["labels"])
        if "instanceType" in group:
            labels["node.kubernetes.io/instance-type"] = group["instanceType"]
        assert gpu_taint in group["taints"]
        assert _pool_accepts(labels, group["taints"], examples[example]), group_name
        # Scale from zero: the autoscaler learns the labels and taints from the node-template tags.
        template_labels = {key.rsplit("/label/", 1)[1]: value for key, value in group["tags"].items()
                           if "/node-template/label/" in key}
        assert examples[example]["spec"]["nodeSelector"].items() <= template_labels.items()
        assert group["tags"]["k8s.io/cluster-autoscaler/node-template/taint/nvidia.com/gpu"] == "true:NoSchedule"


# ---- Kueue ---------------------------------------------------------------------------------------------------

KUEUE_WORKLOAD_RULES = (triples("kueue.x-k8s.io", ["workloads"], ["get", "list", "watch", "create", "delete"])
                        | triples("kueue.x-k8s.io", ["workloads/status"], ["patch"]))
KUEUE_CLUSTER_RULES = triples("kueue.x-k8s.io", ["resourceflavors", "workloadpriorityclasses"], ["get"])


def test_should_grant_no_kueue_access_when_kueue_is_not_installed(helm_bin: Path) -> None:
    for args in ((), ("--set", "rbac.scope=namespace", "--set", "watchNamespaces={team-a}")):
        docs = render(helm_bin, *args)
        granted = set().union(*(rule_set(role) for role in of_kind(docs, "ClusterRole") + of_kind(docs, "Role")))
        assert not {rule for rule in granted if rule[0] == "kueue.x-k8s.io"}


def test_should_grant_kueue_access_without_its_crds_when_kueue_enabled_is_set(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set", "kueue.enabled=true")
    (cluster_role,) = of_kind(docs, "ClusterRole")
    assert KUEUE_WORKLOAD_RULES | KUEUE_CLUSTER_RULES <= rule_set(cluster_role)


def test_should_grant_workloads_per_namespace_and_flavors_cluster_wide_when_kueue_crds_exist(helm_bin: Path) -> None:
    docs = render(helm_bin, "--api-versions", "kueue.x-k8s.io/v1beta2")
    (cluster_role,) = of_kind(docs, "ClusterRole")
    assert KUEUE_WORKLOAD_RULES | KUEUE_CLUSTER_RULES <= rule_set(cluster_role)
    docs = render(helm_bin, "--api-versions", "kueue.x-k8s.io/v1beta2", "--set", "rbac.scope=namespace",
                  "--set", "watchNamespaces={team-a}")
    (role,) = of_kind(docs, "Role")
    (crds,) = of_kind(docs, "ClusterRole")
    assert KUEUE_WORKLOAD_RULES <= rule_set(role) and not KUEUE_CLUSTER_RULES & rule_set(role)
    assert KUEUE_CLUSTER_RULES <= rule_set(crds)
