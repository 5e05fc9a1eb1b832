"""The API layer's pure parts: status merge patches and reading kubeconfigs explicitly."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from finetune_operator.api import connection_from_kubeconfig, merge_patch_between


@pytest.mark.parametrize(
    ("old", "new", "patch"),
    [
        ({}, {}, {}),
        ({"phase": "Pending"}, {"phase": "Pending"}, {}),
        ({"phase": "Pending"}, {"phase": "Running"}, {"phase": "Running"}),
        ({"restartAfter": "t"}, {}, {"restartAfter": None}),
        ({"progress": {"step": 1, "eta": "5s"}}, {"progress": {"step": 2}}, {"progress": {"step": 2, "eta": None}}),
        ({"conditions": [{"type": "A"}]}, {"conditions": [{"type": "A"}, {"type": "B"}]},
         {"conditions": [{"type": "A"}, {"type": "B"}]}),
        ({"model": None}, {"model": {"uri": "x"}}, {"model": {"uri": "x"}}),
    ],
)
def test_merge_patch_between(old: dict[str, object], new: dict[str, object], patch: dict[str, object]) -> None:
    assert merge_patch_between(old, new) == patch


def _write(path: pathlib.Path, user: dict[str, object], cluster: dict[str, object]) -> pathlib.Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "team"}}],
        "clusters": [{"name": "k", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
    }))
    return path


def test_kubeconfig_token_and_relative_files(tmp_path: pathlib.Path) -> None:
    (tmp_path / "token").write_text("secret-token\n")
    path = _write(tmp_path / "kc", {"tokenFile": "token"},
                  {"server": "https://api:6443", "certificate-authority": "ca.crt"})
    info = connection_from_kubeconfig(path)
    assert (info.server, info.token, info.default_namespace) == ("https://api:6443", "secret-token", "team")
    assert info.ca_path == str(tmp_path / "ca.crt")
    assert info.as_http_headers() == {"Authorization": "Bearer secret-token"}


def test_kubeconfig_inline_token(tmp_path: pathlib.Path) -> None:
    info = connection_from_kubeconfig(_write(tmp_path / "kc", {"token": "t"}, {"server": "http://127.0.0.1:1"}))
    assert (info.server, info.token, info.ca_path) == ("http://127.0.0.1:1", "t", None)


def test_kubeconfig_without_current_context_is_a_login_error(tmp_path: pathlib.Path) -> None:
    import kopf

    path = tmp_path / "kc"
    path.write_text("apiVersion: v1\nkind: Config\n")
    with pytest.raises(kopf.LoginError, match="current-context"):
        connection_from_kubeconfig(path)
