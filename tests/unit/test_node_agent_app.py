"""node-agent configuration and start-up checks: clear errors naming the flag, capability or binary."""

from __future__ import annotations

import pytest

from services.node_agent.app import CAP_NET_ADMIN, CAP_SYS_ADMIN, load_config, main, startup_problems
from services.node_agent.apply import Backend
from services.node_agent.errors import ConfigError

ALL_CAPS = (1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN)


def test_defaults_match_upstream_and_dns_is_captured() -> None:
    config = load_config([], {"NODE_NAME": "n1"})
    assert config.zds_socket == "/var/run/ztunnel/ztunnel.sock"
    assert config.cni_socket == "/var/run/istio-cni/pluginevent.sock"
    assert config.backend is Backend.IPTABLES
    assert config.dns_capture and not config.ipv6
    assert not load_config([], {"NODE_NAME": "n1", "DNS_CAPTURE": "false"}).dns_capture
    assert config.verify_interval == 60.0


def test_verify_interval_from_flag_or_environment() -> None:
    env = {"NODE_NAME": "n1", "REDIRECTION_VERIFY_INTERVAL": "5m"}
    assert load_config([], env).verify_interval == 300.0
    assert load_config(["--verify-interval", "500ms"], env).verify_interval == 0.5
    assert load_config(["--verify-interval", "0"], env).verify_interval == 0.0


def test_flags_override_environment() -> None:
    env = {"NODE_NAME": "n1", "DNS_CAPTURE": "true", "RULE_BACKEND": "nftables", "IPV6": "1"}
    config = load_config(["--node-name", "n2", "--no-dns-capture"], env)
    assert (config.node_name, config.dns_capture, config.backend, config.ipv6) == (
        "n2",
        False,
        Backend.NFTABLES,
        True,
    )


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        ([], {}, "node name missing"),
        ([], {"NODE_NAME": "n", "DNS_CAPTURE": "maybe"}, "DNS_CAPTURE='maybe'"),
        (["--health-addr", "nonsense"], {"NODE_NAME": "n"}, "not host:port"),
        ([], {"NODE_NAME": "n", "REDIRECTION_VERIFY_INTERVAL": "often"}, "'often' is not a duration"),
        (["--verify-interval=-1s"], {"NODE_NAME": "n"}, "--verify-interval='-1s' is not a duration"),
    ],
)
def test_bad_config_is_a_clear_error(argv: list[str], env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(argv, env)


def test_startup_check_names_capabilities_and_binaries() -> None:
    config = load_config(["--ipv6"], {"NODE_NAME": "n"})
    problems = startup_problems(config, caps=0, which=lambda name: None)
    text = "\n".join(problems)
    assert "CAP_NET_ADMIN" in text and "CAP_SYS_ADMIN" in text
    assert "missing binary iptables-restore: install it (apt-get install iptables)" in text
    assert "ip6tables-restore" in text
    nft = load_config(["--rule-backend", "nftables"], {"NODE_NAME": "n"})
    assert startup_problems(nft, caps=ALL_CAPS, which=lambda name: None)[-1] == (
        "missing binary nft: install it (apt-get install nftables)"
    )
    assert startup_problems(config, caps=ALL_CAPS, which=lambda name: f"/usr/sbin/{name}") == []


def test_main_reports_config_errors_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--health-addr", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("node-agent: error:") and "Traceback" not in err


def test_the_zds_socket_is_upstreams_setting_with_the_old_names_still_working() -> None:
    env = {"NODE_NAME": "n"}
    assert load_config([], {**env, "ZTUNNEL_UDS_ADDRESS": "/run/a.sock"}).zds_socket == "/run/a.sock"
    assert load_config(["--ztunnel-uds-address", "/run/f.sock"], env).zds_socket == "/run/f.sock"
    assert load_config(["--zds-socket", "/run/old.sock"], env).zds_socket == "/run/old.sock"
    flag_wins = load_config(["--zds-socket", "/run/f.sock"], {**env, "ZTUNNEL_UDS_ADDRESS": "/run/a.sock"})
    assert (flag_wins.zds_socket, flag_wins.warnings) == ("/run/f.sock", ())
    deprecated = load_config([], {**env, "ZDS_SOCKET": "/run/d.sock"})
    assert deprecated.zds_socket == "/run/d.sock"
    assert deprecated.warnings == ("ZDS_SOCKET is deprecated; set ZTUNNEL_UDS_ADDRESS=/run/d.sock instead",)
    both = load_config([], {**env, "ZDS_SOCKET": "/run/d.sock", "ZTUNNEL_UDS_ADDRESS": "/run/a.sock"})
    assert both.zds_socket == "/run/a.sock" and "ZDS_SOCKET=/run/d.sock ignored" in both.warnings[0]


def test_help_documents_the_zds_socket_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--ztunnel-uds-address PATH, --zds-socket PATH" in out and "ZTUNNEL_UDS_ADDRESS" in out
    assert "removed again at exit" in out
