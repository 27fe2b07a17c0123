"""Files holding a token or a key end owner-only (0600) even when a wider file was already at the path:
`O_CREAT`'s mode applies only to a file it creates, so each writer must set the mode itself."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from ambient.kube.apiserver import Pki
from ambient.lab.components import TOKEN_PATH, LabPaths, write_node_secrets
from services.istiod.app import NodeTokens
from services.istiod.ca import CertificateAuthority
from services.istiod.world import Node, World
from shared.secretfile import write_secret


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def world_readable(path: Path, text: str = "old") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o644)


def test_write_secret_narrows_an_existing_world_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    world_readable(path, "a much longer old content than the new one")
    write_secret(path, b"new")
    assert mode(path) == 0o600
    assert path.read_bytes() == b"new"


def test_write_secret_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_secret(tmp_path / "key", b"k")
    finally:
        os.umask(old)
    assert mode(tmp_path / "key") == 0o600


def test_istiod_node_token_file_left_0644_becomes_0600(tmp_path: Path) -> None:
    token = tmp_path / "tokens" / "node-a.token"
    world_readable(token, "kept-token")
    tokens = NodeTokens({}, tmp_path / "tokens").ensure(World(nodes=[Node(name="node-a")]))
    assert tokens == {"node-a": "kept-token"}
    assert mode(token) == 0o600


def test_istiod_root_key_written_over_a_0644_file_is_0600(tmp_path: Path) -> None:
    key = tmp_path / "root-key.pem"
    world_readable(key)  # no root-cert.pem beside it: a new CA is made and its key written here
    CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    assert mode(key) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN")


def test_lab_node_token_left_0644_becomes_0600(tmp_path: Path) -> None:
    paths = LabPaths(tmp_path)
    token = paths.node_dir("node-a") / TOKEN_PATH
    world_readable(token)
    write_node_secrets(paths, "node-a", "fresh")
    assert mode(token) == 0o600
    assert token.read_text() == "fresh"


@pytest.mark.parametrize("which", [lambda p: p.serving_key, lambda p: p.admin_key, lambda p: p.sa_key],
                         ids=["serving", "admin", "service-account"])
def test_apiserver_keys_left_0644_become_0600(tmp_path: Path, which: Callable[[Pki], Path]) -> None:
    pki = Pki(tmp_path / "pki")
    world_readable(which(pki))
    pki.generate()
    assert mode(which(pki)) == 0o600
