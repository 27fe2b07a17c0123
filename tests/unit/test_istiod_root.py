"""istiod's own root CA given on the command line (--root-cert/--root-key): the pair must match, and a state
directory's root (kept with its root-key.pem) is never overwritten."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from services.istiod.app import _load_ca
from services.istiod.ca import CertificateAuthority
from services.istiod.errors import StartupError
from services.istiod.world import World
from shared.identity import key_to_pem


def given(tmp_path: Path, cert_of: CertificateAuthority, key_of: CertificateAuthority) -> argparse.Namespace:
    cert, key = tmp_path / "given-cert.pem", tmp_path / "given-key.pem"
    cert.write_text(cert_of.root_pem)
    key.write_bytes(key_to_pem(key_of.root_key))
    return argparse.Namespace(root_cert=cert, root_key=key)


def test_a_root_key_that_is_not_the_certificates_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    state = tmp_path / "state"
    args = given(tmp_path, CertificateAuthority.create(), CertificateAuthority.create())
    with pytest.raises(StartupError, match=r"--root-key .* is not the key of --root-cert"):
        _load_ca(args, state, World())
    assert not state.exists()


def test_a_state_dirs_own_root_is_never_overwritten(tmp_path: Path) -> None:
    state = tmp_path / "state"
    own = CertificateAuthority.load_or_create(state, "cluster.local")
    other = CertificateAuthority.create()
    ca, root_path = _load_ca(given(tmp_path, other, other), state, World())
    assert ca.root_pem == other.root_pem
    assert (state / "root-cert.pem").read_text() == own.root_pem  # still the pair of its root-key.pem
    assert root_path == tmp_path / "given-cert.pem"  # what clients are told to trust


def test_a_matching_pair_goes_into_an_empty_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    mine = CertificateAuthority.create()
    ca, root_path = _load_ca(given(tmp_path, mine, mine), state, World())
    assert root_path == state / "root-cert.pem" and root_path.read_text() == mine.root_pem == ca.root_pem
    _, again = _load_ca(given(tmp_path, mine, mine), state, World())  # a restart with the same pair
    assert again == state / "root-cert.pem"
