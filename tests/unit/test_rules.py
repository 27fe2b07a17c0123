"""Golden tests for the in-pod redirection rules (upstream's iptables and nftables rule sets, per setting).

Each case renders the iptables-restore input (v4 in `<case>.golden`, v6 in `<case>_ipv6.golden`) and the
nftables script (`nft_<case>.golden`, `nft_<case>_ipv6.golden` with both families), compared byte for byte.
Regenerate after a deliberate change with `UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_rules.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.node_agent.errors import PodConfigError
from services.node_agent.model import (
    ANNOTATION_BYPASS_INBOUND,
    ANNOTATION_DNS_CAPTURE,
    ANNOTATION_VIRTUAL_INTERFACES,
)
from services.node_agent.rules import (
    Family,
    PodRedirect,
    RuleSettings,
    delete_commands,
    expected_saved,
    inpod_rules,
    parse_saved,
    policy_routes,
    render_nft,
    render_nft_delete,
    render_repair,
    render_restore,
    resolve_redirect,
)

TESTDATA = Path(__file__).parent / "testdata" / "rules"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
VIRT = "fake1s0f0,fake1s0f1"

# case name -> (global DNS capture, pod annotations, ingress_keeps_connmark)
CASES: dict[str, tuple[bool, dict[str, str], bool]] = {
    "default": (False, {}, True),
    "dns_on_globally": (True, {}, True),
    "dns_pod_disabled_and_on_globally": (True, {ANNOTATION_DNS_CAPTURE: "false"}, True),
    "dns_pod_enabled_and_off_globally": (False, {ANNOTATION_DNS_CAPTURE: "true"}, True),
    "ingress": (False, {ANNOTATION_BYPASS_INBOUND: "true"}, True),
    "ingress_legacy": (False, {ANNOTATION_BYPASS_INBOUND: "true"}, False),
    "virtual_interfaces": (False, {ANNOTATION_VIRTUAL_INTERFACES: VIRT}, True),
    "ingress_and_virtual_interfaces": (
        False,
        {ANNOTATION_BYPASS_INBOUND: "true", ANNOTATION_VIRTUAL_INTERFACES: VIRT},
        True,
    ),
}


def check_golden(name: str, text: str) -> None:
    path = TESTDATA / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"missing golden {path}; run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs from its golden file"


def settings_for(case: str, *, ipv6: bool) -> tuple[PodRedirect, RuleSettings]:
    dns, annotations, keep = CASES[case]
    settings = RuleSettings(dns_capture=dns, ipv6=ipv6, ingress_keeps_connmark=keep)
    return resolve_redirect(annotations, settings), settings


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", [Family.V4, Family.V6])
def test_restore_text_matches_golden(case: str, family: Family) -> None:
    redirect, settings = settings_for(case, ipv6=family is Family.V6)
    text = render_restore(redirect, settings, family)
    assert text == render_restore(redirect, settings, family)
    suffix = "" if family is Family.V4 else "_ipv6"
    check_golden(f"{case}{suffix}.golden", text)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("ipv6", [False, True])
def test_nft_text_matches_golden(case: str, ipv6: bool) -> None:
    redirect, settings = settings_for(case, ipv6=ipv6)
    text = render_nft(redirect, settings)
    assert text == render_nft(redirect, settings)
    check_golden(f"nft_{case}{'_ipv6' if ipv6 else ''}.golden", text)


def test_dns_on_globally_is_the_upstream_script_text() -> None:
    """Upstream's ztunnel-redirect-inpod.sh, in restore-input form: same rules, same per-chain order."""
    redirect, settings = settings_for("dns_on_globally", ipv6=False)
    saved = expected_saved(redirect, settings, Family.V4)
    assert saved[("nat", "ISTIO_OUTPUT")] == [
        "-d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
        "! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053",
        "! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff "
        "-j REDIRECT --to-ports 15053",
        "-p tcp -m mark --mark 0x111/0xfff -j ACCEPT",
        "! -d 127.0.0.1/32 -o lo -j ACCEPT",
        "! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
    ]
    assert saved[("nat", "ISTIO_PRERT")] == [
        "-s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
        "! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff "
        "-j REDIRECT --to-ports 15006",
    ]
    assert saved[("raw", "ISTIO_PRERT")] == [
        "-p udp -m mark ! --mark 0x539/0xfff -m udp --sport 53 -j CT --zone 1"
    ]


def test_nft_default_equals_upstream_golden() -> None:
    """Upstream's nftables `default.golden` is rendered with DNS capture on."""
    redirect, settings = settings_for("dns_on_globally", ipv6=False)
    assert render_nft(redirect, settings) == (TESTDATA / "nft_upstream_default.golden").read_text()


def test_ingress_omits_inbound_capture() -> None:
    redirect, settings = settings_for("ingress_legacy", ipv6=False)
    specs = [r.spec for r in inpod_rules(redirect, settings, Family.V4)]
    assert not any("15006" in s or "-s 169.254.7.127" in s or "--set-xmark" in s for s in specs)
    redirect, settings = settings_for("ingress", ipv6=False)
    specs = [r.spec for r in inpod_rules(redirect, settings, Family.V4)]
    assert any("--set-xmark" in s for s in specs)
    assert not any("15006" in s for s in specs)


def test_virtual_interfaces_come_first_in_nat_prerouting() -> None:
    redirect, settings = settings_for("virtual_interfaces", ipv6=False)
    nat_prert = [
        r.spec
        for r in inpod_rules(redirect, settings, Family.V4)
        if r.chain == "ISTIO_PRERT" and r.table == "nat"
    ]
    assert nat_prert[:4] == [
        "-i fake1s0f0 -p tcp -j REDIRECT --to-ports 15001",
        "-i fake1s0f0 -p tcp -j RETURN",
        "-i fake1s0f1 -p tcp -j REDIRECT --to-ports 15001",
        "-i fake1s0f1 -p tcp -j RETURN",
    ]


def test_ipv6_substitutes_loopback_and_snat() -> None:
    redirect, settings = settings_for("default", ipv6=True)
    text = render_restore(redirect, settings, Family.V6)
    assert "127.0.0.1" not in text and "169.254.7.127" not in text
    assert "! -d ::1/128" in text and "-d fd16:9254:7127:1337:ffff:ffff:ffff:ffff -p tcp" in text


def test_policy_routes() -> None:
    v4_only = policy_routes(RuleSettings(ipv6=True), lo_ipv6_enabled=False)
    assert [r.family for r in v4_only] == [Family.V4]
    both = policy_routes(RuleSettings(ipv6=True), lo_ipv6_enabled=True)
    check_golden("policy_routes_ipv6.golden", "".join(r.describe() for r in both))
    assert both[0].describe() == (
        "ip rule add fwmark 0x111/0xfff pref 32764 lookup 100\n"
        "ip route replace local 0.0.0.0/0 dev lo table 100\n"
    )
    assert [r.family for r in policy_routes(RuleSettings(ipv6=False), lo_ipv6_enabled=True)] == [Family.V4]


@pytest.mark.parametrize("family", [Family.V4, Family.V6])
def test_delete_commands_golden(family: Family) -> None:
    text = "\n".join(" ".join(argv) for argv in delete_commands(family)) + "\n"
    check_golden(f"default_delete{'' if family is Family.V4 else '_ipv6'}.golden", text)


def test_nft_delete_is_unconditional_or_limited_to_present() -> None:
    check_golden("nft_delete.golden", render_nft_delete())
    assert (
        render_nft_delete(present=frozenset({"istio-ambient-nat"})) == "delete table inet istio-ambient-nat\n"
    )
    assert render_nft_delete(present=frozenset()) == ""


def test_parse_saved_round_trips_expected() -> None:
    redirect, settings = settings_for("dns_on_globally", ipv6=False)
    expected = expected_saved(redirect, settings, Family.V4)
    lines: list[str] = []
    for table in ("mangle", "nat", "raw"):
        lines += [f"*{table}", ":PREROUTING ACCEPT [0:0]", ":ISTIO_OUTPUT - [0:0]", ":ISTIO_PRERT - [0:0]"]
        lines += [
            f"-A {chain} {spec}" for (t, chain), specs in expected.items() if t == table for spec in specs
        ]
        lines += ["-A PREROUTING -j OTHER", "COMMIT"]
    assert parse_saved("\n".join(lines)) == expected


@pytest.mark.parametrize(
    ("annotations", "needle"),
    [
        ({ANNOTATION_DNS_CAPTURE: "yes"}, "is not a boolean"),
        ({ANNOTATION_BYPASS_INBOUND: "maybe"}, "is not a boolean"),
        ({ANNOTATION_VIRTUAL_INTERFACES: "eth0,bad name"}, "not a valid interface name"),
        ({ANNOTATION_VIRTUAL_INTERFACES: "x" * 16}, "not a valid interface name"),
        ({ANNOTATION_VIRTUAL_INTERFACES: "eth0;-j ACCEPT"}, "not a valid interface name"),
    ],
)
def test_bad_annotations_are_rejected(annotations: dict[str, str], needle: str) -> None:
    with pytest.raises(PodConfigError, match=needle):
        resolve_redirect(annotations, RuleSettings())


def test_parse_bool_accepts_go_spellings() -> None:
    for value in ("1", "t", "T", "TRUE", "true", "True"):
        assert resolve_redirect({ANNOTATION_DNS_CAPTURE: value}, RuleSettings()).dns_capture
    for value in ("0", "f", "F", "FALSE", "false", "False"):
        assert not resolve_redirect(
            {ANNOTATION_DNS_CAPTURE: value}, RuleSettings(dns_capture=True)
        ).dns_capture


def test_repair_text_flushes_our_chains_drops_found_jumps_and_refills() -> None:
    redirect, settings = settings_for("default", ipv6=False)
    have = {
        ("nat", "OUTPUT"): ["-j ISTIO_OUTPUT", "-j ISTIO_OUTPUT"],  # a duplicated jump
        ("nat", "ISTIO_OUTPUT"): ["-p tcp -j ACCEPT"],  # drifted contents
        ("nat", "ISTIO_PRERT"): [],
        ("raw", "PREROUTING"): ["-j ISTIO_PRERT"],  # left over from DNS capture
        ("raw", "ISTIO_PRERT"): [],
    }
    text = render_repair(redirect, settings, Family.V4, have)
    check_golden("repair_default.golden", text)
    assert text.count("-D OUTPUT -j ISTIO_OUTPUT") == 2
    assert "* raw\n:ISTIO_PRERT - [0:0]\n-D PREROUTING -j ISTIO_PRERT\n-X ISTIO_PRERT\nCOMMIT\n" in text
    assert render_repair(redirect, settings, Family.V4, {}, install=False) == ""
    removal = render_repair(redirect, settings, Family.V6, {("mangle", "ISTIO_PRERT"): []}, install=False)
    assert removal == "* mangle\n:ISTIO_PRERT - [0:0]\n-X ISTIO_PRERT\nCOMMIT\n"
