"""The local control plane's certificates and kubeconfigs, and the kubelet's service-account token volumes."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from localcluster.kubelet_pods import ContainerConfigError, PodContext, token_requests
from localcluster.kubelet_volumes import volume_files
from localcluster.pki import CertificateAuthority, KeyPair, write_kubeconfig, write_signing_key


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("pki"))


def load(pair: KeyPair) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pair.cert.read_bytes())


def names(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(attribute.value) for attribute in cert.subject.get_attributes_for_oid(oid)]


@pytest.mark.parametrize(
    ("user", "groups"),
    [
        pytest.param("system:node:localnode", ("system:nodes",), id="kubelet"),
        pytest.param("kubernetes-admin", ("system:masters",), id="admin"),
        pytest.param("system:kube-scheduler", (), id="scheduler"),
    ],
)
def test_a_client_certificate_names_the_user_and_groups_and_is_signed_by_the_ca(
    ca: CertificateAuthority, user: str, groups: tuple[str, ...]
) -> None:
    cert = load(ca.issue(f"client-{len(groups)}-{user.replace(':', '-')}", user, organizations=groups))
    # The API server's x509 authenticator: the user is the common name, the groups the organisations.
    assert names(cert, NameOID.COMMON_NAME) == [user]
    assert names(cert, NameOID.ORGANIZATION_NAME) == list(groups)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    authority = load(ca.pair)
    cert.verify_directly_issued_by(authority)
    assert authority.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_serving_certificate_carries_its_addresses_and_names(ca: CertificateAuthority) -> None:
    pair = ca.issue("serving", "kube-apiserver", client=False, server_names=("127.0.0.1", "kubernetes.default"))
    cert = load(pair)
    alternatives = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alternatives.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert alternatives.get_values_for_type(x509.DNSName) == ["kubernetes.default"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert pair.key.stat().st_mode & 0o777 == 0o600


def test_the_signing_key_pair_matches(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    pair = write_signing_key(tmp_path)
    private = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    public = serialization.load_pem_public_key(pair.cert.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert private.public_key().public_numbers() == public.public_numbers()


@pytest.mark.parametrize(
    ("client", "token", "expected_user"),
    [
        pytest.param(KeyPair(Path("/pki/a.crt"), Path("/pki/a.key")), None,
                     {"client-certificate": "/pki/a.crt", "client-key": "/pki/a.key"}, id="certificate"),
        pytest.param(None, "eyJ.token", {"token": "eyJ.token"}, id="token"),
    ],
)
def test_a_kubeconfig_holds_one_identity(
    tmp_path: Path, client: KeyPair | None, token: str | None, expected_user: dict[str, str]
) -> None:
    path = write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:6443", Path("/pki/ca.crt"), client=client,
                            token=token, namespace="team-a", user="me")
    config = yaml.safe_load(path.read_text())
    assert config["clusters"][0]["cluster"] == {"server": "https://127.0.0.1:6443",
                                                "certificate-authority": "/pki/ca.crt"}
    assert config["users"] == [{"name": "me", "user": expected_user}]
    assert config["contexts"][0]["context"]["namespace"] == "team-a"
    assert config["current-context"] == "me"
    assert path.stat().st_mode & 0o777 == 0o600


# ---- service-account token volumes (the ServiceAccount admission plugin's kube-api-access volume) ----------

API_ACCESS = {
    "name": "kube-api-access-x",
    "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
    ]},
}
POD = {"metadata": {"name": "p", "namespace": "ns", "uid": "u-1"}, "spec": {"volumes": [API_ACCESS]}}


def test_token_requests_bind_each_token_to_the_pod() -> None:
    assert token_requests(POD) == [("kube-api-access-x", "token", {
        "audiences": [],
        "expirationSeconds": 3607,
        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u-1"},
    })]


def test_the_projected_volume_holds_the_token_the_ca_and_the_namespace() -> None:
    context = PodContext(pod_ip="127.0.0.2", service_account_tokens={("kube-api-access-x", "token"): "eyJ.t"})
    configmaps = {"kube-root-ca.crt": {"data": {"ca.crt": "PEM"}}}
    files = volume_files(API_ACCESS, POD, context, configmaps, {})
    assert files == {"token": (b"eyJ.t", 420), "ca.crt": (b"PEM", 420), "namespace": (b"ns", 420)}


def test_a_projected_token_not_fetched_fails_the_mount() -> None:
    with pytest.raises(ContainerConfigError, match="no token for 'token'"):
        volume_files(API_ACCESS, POD, PodContext(pod_ip="127.0.0.2"), {"kube-root-ca.crt": {"data": {}}}, {})
