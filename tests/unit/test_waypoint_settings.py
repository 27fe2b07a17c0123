"""The waypoint's settings: its identity from the pod's, and one clear line (exit 2) for what is missing."""

from __future__ import annotations

import pytest

from services.waypoint import app
from services.waypoint.app import load_settings
from services.waypoint.errors import WaypointConfigError
from shared.identity import SpiffeId

BASE = {"XDS_ADDRESS": "http://127.0.0.1:15010", "POD_NAMESPACE": "bookinfo", "INSTANCE_IP": "10.0.0.9"}


def test_identity_and_addresses() -> None:
    settings = load_settings({**BASE, "SERVICE_ACCOUNT": "wp", "WAYPOINT_HBONE_ADDR": "10.0.0.9:15008"})
    assert settings.identity == SpiffeId(trust_domain="cluster.local", namespace="bookinfo",
                                         service_account="wp")
    assert settings.hbone_addr == ("10.0.0.9", 15008)
    assert load_settings(BASE).identity.service_account == "waypoint"
    assert load_settings(BASE).hbone_addr == (None, 15008)


@pytest.mark.parametrize(("missing", "needle"), [
    ("XDS_ADDRESS", "XDS_ADDRESS is not set"), ("POD_NAMESPACE", "POD_NAMESPACE is not set"),
    ("INSTANCE_IP", "INSTANCE_IP is not set"),
])
def test_missing_settings_are_named(missing: str, needle: str) -> None:
    env = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(WaypointConfigError, match=needle):
        load_settings(env)


def test_malformed_setting_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in {**BASE, "WAYPOINT_HBONE_ADDR": "nonsense"}.items():
        monkeypatch.setenv(key, value)
    assert app.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("waypoint: WAYPOINT_HBONE_ADDR=") and err.count("\n") == 1
