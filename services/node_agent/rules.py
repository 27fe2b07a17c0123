"""In-pod redirection rules, rendered as upstream istio-cni renders them. Pure: no I/O, no clock.

Theory of operation
-------------------
`resolve_redirect(annotations, settings)` turns a pod's annotations and the agent's settings into a
`PodRedirect` (DNS capture on or off, inbound bypass, virtual interfaces), rejecting values upstream would
not accept. `inpod_rules(redirect, settings, family)` lists the rules in upstream's generation order (one
`IptRule` per rule, numbered in that order in comments); every other function renders that one list:

- `render_restore`      the `iptables-restore --noflush` / `ip6tables-restore --noflush` input,
- `render_repair`       restore input that turns a drifted state into exactly ours, in one transaction,
- `expected_saved`      what `iptables-save` shows once that input is applied (used to detect drift),
- `render_nft`          the native nftables script, both families in `inet` tables,
- `delete_commands`     the idempotent delete: jumps, then flush, then delete the chains,
- `policy_routes`       the fwmark rule and the table-100 local route.

Rendering twice gives the same text; golden files under tests/unit/testdata/rules/ pin it byte for byte.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping

import msgspec

from services.node_agent.errors import PodConfigError
from services.node_agent.model import (
    ANNOTATION_BYPASS_INBOUND,
    ANNOTATION_DNS_CAPTURE,
    ANNOTATION_VIRTUAL_INTERFACES,
)

INPOD_MARK = 0x539
INPOD_MASK = 0xFFF
INPOD_TPROXY_MARK = 0x111
INPOD_TPROXY_MASK = 0xFFF
INPOD_RESTORE_MASK = 0xFFFFFFFF
ROUTE_TABLE_INBOUND = 100
RULE_PRIORITY = 32764
CHAIN_PRERT = "ISTIO_PRERT"
CHAIN_OUTPUT = "ISTIO_OUTPUT"
ZTUNNEL_OUTBOUND_PORT = 15001
ZTUNNEL_INBOUND_PLAINTEXT_PORT = 15006
ZTUNNEL_INBOUND_PORT = 15008
DNS_CAPTURE_PORT = 15053
HOST_PROBE_SNAT_IPV4 = "169.254.7.127"
HOST_PROBE_SNAT_IPV6 = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
TABLES = ("mangle", "nat", "raw")
NFT_TABLES = ("istio-ambient-nat", "istio-ambient-mangle", "istio-ambient-raw")

_MARK = f"{INPOD_MARK:#x}/{INPOD_MASK:#x}"
_TPROXY_MARK = f"{INPOD_TPROXY_MARK:#x}/{INPOD_TPROXY_MASK:#x}"
_IFNAME = re.compile(r"^[A-Za-z0-9_.@:-]{1,15}$")
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


class Family(enum.Enum):
    V4 = 4
    V6 = 6

    @property
    def loopback(self) -> str:
        return "127.0.0.1/32" if self is Family.V4 else "::1/128"

    @property
    def any_net(self) -> str:
        return "0.0.0.0/0" if self is Family.V4 else "::/0"

    @property
    def restore_binary(self) -> str:
        return "iptables-restore" if self is Family.V4 else "ip6tables-restore"

    @property
    def save_binary(self) -> str:
        return "iptables-save" if self is Family.V4 else "ip6tables-save"

    @property
    def binary(self) -> str:
        return "iptables" if self is Family.V4 else "ip6tables"


class RuleSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Node-wide settings that shape every pod's rules."""

    dns_capture: bool = False
    """Global DNS capture (upstream REDIRECT_DNS); a pod may override it with its annotation."""
    ipv6: bool = False
    """Also render/apply the ip6tables twin and the v6 policy route (upstream ENABLE_INBOUND_IPV6)."""
    host_probe_snat_ipv4: str = HOST_PROBE_SNAT_IPV4
    host_probe_snat_ipv6: str = HOST_PROBE_SNAT_IPV6
    ingress_keeps_connmark: bool = True
    """Keep rule 8 (mark -> connmark 0x111) for pods in inbound-bypass mode. Newer upstream releases keep it
    because without it replies to inbound HBONE miss the table-100 route (istio/istio#58546); False renders
    the older text, where ingress mode drops rules 8, 9 and 11."""

    def snat(self, family: Family) -> str:
        return self.host_probe_snat_ipv4 if family is Family.V4 else self.host_probe_snat_ipv6


class PodRedirect(msgspec.Struct, frozen=True, kw_only=True):
    """The per-pod choices, resolved from annotations and settings."""

    dns_capture: bool = False
    bypass_inbound: bool = False
    virtual_interfaces: tuple[str, ...] = ()


class IptRule(msgspec.Struct, frozen=True, kw_only=True):
    """One rule: `spec` is the restore-input text after `-A <chain> `, `saved` what iptables-save prints."""

    table: str
    chain: str
    spec: str
    saved: str


class PolicyRoute(msgspec.Struct, frozen=True, kw_only=True):
    """`ip rule add fwmark MARK/MASK pref PRIO lookup TABLE` + `ip route replace local ANY dev lo table N`."""

    family: Family
    fwmark: int = INPOD_TPROXY_MARK
    fwmask: int = INPOD_TPROXY_MASK
    priority: int = RULE_PRIORITY
    table: int = ROUTE_TABLE_INBOUND

    @property
    def dst(self) -> str:
        return self.family.any_net

    def describe(self) -> str:
        ip = "ip" if self.family is Family.V4 else "ip -6"
        return (
            f"{ip} rule add fwmark {self.fwmark:#x}/{self.fwmask:#x} "
            f"pref {self.priority} lookup {self.table}\n"
            f"{ip} route replace local {self.dst} dev lo table {self.table}\n"
        )


def parse_bool(value: str, *, what: str) -> bool:
    """Go's strconv.ParseBool, which upstream uses for pod annotations."""
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise PodConfigError(f"{what}={value!r} is not a boolean; use true or false")


def resolve_redirect(annotations: Mapping[str, str], settings: RuleSettings) -> PodRedirect:
    """The pod's redirection choices.

    Raises:
        PodConfigError: an annotation has a value upstream would reject, or names an impossible interface.
    """
    dns = settings.dns_capture
    if ANNOTATION_DNS_CAPTURE in annotations:
        dns = parse_bool(annotations[ANNOTATION_DNS_CAPTURE], what=ANNOTATION_DNS_CAPTURE)
    bypass = False
    if ANNOTATION_BYPASS_INBOUND in annotations:
        bypass = parse_bool(annotations[ANNOTATION_BYPASS_INBOUND], what=ANNOTATION_BYPASS_INBOUND)
    interfaces: list[str] = []
    for raw in annotations.get(ANNOTATION_VIRTUAL_INTERFACES, "").split(","):
        name = raw.strip()
        if not name:
            continue
        if not _IFNAME.match(name):
            raise PodConfigError(
                f"{ANNOTATION_VIRTUAL_INTERFACES}: {name!r} is not a valid interface name "
                "(1-15 characters of letters, digits, '_', '.', '-', '@', ':')"
            )
        interfaces.append(name)
    return PodRedirect(dns_capture=dns, bypass_inbound=bypass, virtual_interfaces=tuple(interfaces))


def inpod_rules(redirect: PodRedirect, settings: RuleSettings, family: Family) -> list[IptRule]:
    """The rules in upstream's generation order; the comments number them in that order."""
    lo = family.loopback
    snat = settings.snat(family)
    snat_saved = f"{snat}/32" if family is Family.V4 else f"{snat}/128"
    dns = redirect.dns_capture
    ingress = redirect.bypass_inbound
    not_ours = f"-m mark ! --mark {_MARK}"
    rules: list[IptRule] = []

    def add(table: str, chain: str, spec: str, saved: str | None = None) -> None:
        rules.append(IptRule(table=table, chain=chain, spec=spec, saved=saved if saved is not None else spec))

    add("mangle", "PREROUTING", f"-j {CHAIN_PRERT}")  # 1
    add("mangle", "OUTPUT", f"-j {CHAIN_OUTPUT}")  # 2
    add("nat", "OUTPUT", f"-j {CHAIN_OUTPUT}")  # 3
    if dns:
        add("raw", "PREROUTING", f"-j {CHAIN_PRERT}")  # 4
        add("raw", "OUTPUT", f"-j {CHAIN_OUTPUT}")  # 5
    add("nat", "PREROUTING", f"-j {CHAIN_PRERT}")  # 6
    for ifname in redirect.virtual_interfaces:  # 7
        add("nat", CHAIN_PRERT, f"-i {ifname} -p tcp -j REDIRECT --to-ports {ZTUNNEL_OUTBOUND_PORT}")
        add("nat", CHAIN_PRERT, f"-i {ifname} -p tcp -j RETURN")
    if not ingress or settings.ingress_keeps_connmark:  # 8
        add("mangle", CHAIN_PRERT, f"-m mark --mark {_MARK} -j CONNMARK --set-xmark {_TPROXY_MARK}")
    if not ingress:  # 9
        add(
            "nat",
            CHAIN_PRERT,
            f"-s {snat} -p tcp -m tcp -j ACCEPT",
            f"-s {snat_saved} -p tcp -m tcp -j ACCEPT",
        )
    add(
        "nat", CHAIN_OUTPUT, f"-d {snat} -p tcp -m tcp -j ACCEPT", f"-d {snat_saved} -p tcp -m tcp -j ACCEPT"
    )  # 10
    if not ingress:  # 11
        add(
            "nat",
            CHAIN_PRERT,
            f"! -d {lo} -p tcp ! --dport {ZTUNNEL_INBOUND_PORT} {not_ours} "
            f"-j REDIRECT --to-ports {ZTUNNEL_INBOUND_PLAINTEXT_PORT}",
            f"! -d {lo} -p tcp -m tcp ! --dport {ZTUNNEL_INBOUND_PORT} {not_ours} "
            f"-j REDIRECT --to-ports {ZTUNNEL_INBOUND_PLAINTEXT_PORT}",
        )
    add(  # 12
        "mangle",
        CHAIN_OUTPUT,
        f"-m connmark --mark {_TPROXY_MARK} -j CONNMARK --restore-mark "
        f"--nfmask {INPOD_RESTORE_MASK:#x} --ctmask {INPOD_RESTORE_MASK:#x}",
    )
    if dns:
        add(  # 13
            "nat",
            CHAIN_OUTPUT,
            f"! -o lo -p udp {not_ours} -m udp --dport 53 -j REDIRECT --to-port {DNS_CAPTURE_PORT}",
            f"! -o lo -p udp {not_ours} -m udp --dport 53 -j REDIRECT --to-ports {DNS_CAPTURE_PORT}",
        )
        add(  # 14
            "nat",
            CHAIN_OUTPUT,
            f"! -d {lo} -p tcp --dport 53 {not_ours} -j REDIRECT --to-ports {DNS_CAPTURE_PORT}",
            f"! -d {lo} -p tcp -m tcp --dport 53 {not_ours} -j REDIRECT --to-ports {DNS_CAPTURE_PORT}",
        )
        add("raw", CHAIN_OUTPUT, f"-p udp -m mark --mark {_MARK} -m udp --dport 53 -j CT --zone 1")  # 15
        add("raw", CHAIN_PRERT, f"-p udp {not_ours} -m udp --sport 53 -j CT --zone 1")  # 16
    add("nat", CHAIN_OUTPUT, f"-p tcp -m mark --mark {_TPROXY_MARK} -j ACCEPT")  # 17
    add("nat", CHAIN_OUTPUT, f"! -d {lo} -o lo -j ACCEPT")  # 18
    add(  # 19
        "nat",
        CHAIN_OUTPUT,
        f"! -d {lo} -p tcp {not_ours} -j REDIRECT --to-ports {ZTUNNEL_OUTBOUND_PORT}",
    )
    return rules


def render_restore(redirect: PodRedirect, settings: RuleSettings, family: Family) -> str:
    """The `iptables-restore --noflush -v` (or ip6tables) input, table by table, as upstream writes it."""
    rules = inpod_rules(redirect, settings, family)
    out: list[str] = []
    for table in TABLES:
        table_rules = [r for r in rules if r.table == table]
        if not table_rules:
            continue
        out += [f"* {table}", f"-N {CHAIN_PRERT}", f"-N {CHAIN_OUTPUT}"]
        out += [f"-A {r.chain} {r.spec}" for r in table_rules]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def expected_saved(
    redirect: PodRedirect, settings: RuleSettings, family: Family
) -> dict[tuple[str, str], list[str]]:
    """What `iptables-save` must show for our rules: (table, chain) -> rule texts in order.

    Jumps from built-in chains are included under the built-in chain. Chains we own but left empty in a table
    (e.g. nat ISTIO_PRERT in ingress mode) appear with an empty list so a missing chain counts as drift.
    """
    expected: dict[tuple[str, str], list[str]] = {}
    rules = inpod_rules(redirect, settings, family)
    for table in TABLES:
        if any(r.table == table for r in rules):
            expected[(table, CHAIN_PRERT)] = []
            expected[(table, CHAIN_OUTPUT)] = []
    for r in rules:
        expected.setdefault((r.table, r.chain), []).append(r.saved)
    return expected


def parse_saved(text: str) -> dict[tuple[str, str], list[str]]:
    """Our part of `iptables-save` output: rules of ISTIO_* chains, and built-in chain rules jumping to them.

    Chains we own that exist but are empty map to an empty list, so their presence is visible.
    """
    found: dict[tuple[str, str], list[str]] = {}
    ours = (CHAIN_PRERT, CHAIN_OUTPUT)
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":"):
            chain = line[1:].split()[0]
            if chain in ours:
                found.setdefault((table, chain), [])
        elif line.startswith("-A "):
            _, chain, spec = line.split(" ", 2)
            if chain in ours or (spec.split()[-1] in ours and spec.split()[-2] == "-j"):
                found.setdefault((table, chain), []).append(spec)
    return found


def render_repair(
    redirect: PodRedirect,
    settings: RuleSettings,
    family: Family,
    have: Mapping[tuple[str, str], list[str]],
    *,
    install: bool = True,
) -> str:
    """restore input that turns the state `have` (from `parse_saved`) into exactly our rules, in place.

    Per table: our chains are declared `:CHAIN - [0:0]` (with --noflush this flushes an existing chain and
    creates a missing one), every jump found in a built-in chain is deleted (`-D`, once per copy found),
    then the wanted rules are appended. Tables that should hold nothing (raw once DNS capture is off, all of
    them when `install` is False) lose their chains (`-X`). iptables-nft applies the whole input in one
    transaction, so traffic never sees a moment without redirection.
    """
    rules = inpod_rules(redirect, settings, family) if install else []
    ours = (CHAIN_PRERT, CHAIN_OUTPUT)
    out: list[str] = []
    for table in TABLES:
        wanted = [r for r in rules if r.table == table]
        present = [c for c in ours if (table, c) in have]
        jumps = [
            (c, spec) for (t, c), specs in have.items() if t == table and c not in ours for spec in specs
        ]
        if not wanted and not present and not jumps:
            continue
        out.append(f"* {table}")
        out += [f":{c} - [0:0]" for c in (ours if wanted else present)]
        out += [f"-D {c} {spec}" for c, spec in jumps]
        if wanted:
            out += [f"-A {r.chain} {r.spec}" for r in wanted]
        else:
            out += [f"-X {c}" for c in present]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def delete_commands(family: Family) -> list[list[str]]:
    """argv lists that remove our rules: jumps, then -F, then -X, for mangle, nat and raw.

    Each may fail when the thing is already gone; the caller ignores those failures.
    """
    cmd = family.binary
    out: list[list[str]] = []
    jumps = (
        ("mangle", "PREROUTING", CHAIN_PRERT),
        ("mangle", "OUTPUT", CHAIN_OUTPUT),
        ("nat", "PREROUTING", CHAIN_PRERT),
        ("nat", "OUTPUT", CHAIN_OUTPUT),
        ("raw", "PREROUTING", CHAIN_PRERT),
        ("raw", "OUTPUT", CHAIN_OUTPUT),
    )
    for table, builtin, target in jumps:
        out.append([cmd, "-w", "-t", table, "-D", builtin, "-j", target])
    for op in ("-F", "-X"):
        for table in TABLES:
            for chain in (CHAIN_PRERT, CHAIN_OUTPUT):
                out.append([cmd, "-w", "-t", table, op, chain])
    return out


def policy_routes(settings: RuleSettings, *, lo_ipv6_enabled: bool) -> list[PolicyRoute]:
    """The fwmark rule + local route per family: v4 always, v6 when enabled and the pod's lo has IPv6."""
    routes = [PolicyRoute(family=Family.V4)]
    if settings.ipv6 and lo_ipv6_enabled:
        routes.append(PolicyRoute(family=Family.V6))
    return routes


def families(settings: RuleSettings) -> tuple[Family, ...]:
    return (Family.V4, Family.V6) if settings.ipv6 else (Family.V4,)


# --- nftables ----------------------------------------------------------------------------------------------


def render_nft(redirect: PodRedirect, settings: RuleSettings) -> str:
    """The `nft -f` script: three inet tables (nat, mangle, raw[dns]), each added and flushed first so that
    applying the script again replaces its contents atomically. v6 twins follow their v4 rule when enabled."""
    fams = families(settings)
    dns = redirect.dns_capture
    ingress = redirect.bypass_inbound
    lines: list[str] = []

    def table(name: str, hooks: tuple[tuple[str, str, str, int], ...]) -> None:
        lines.append(f"add table inet {name}")
        lines.append(f"flush table inet {name}")
        for chain, kind, hook, prio in hooks:
            lines.append(f"add chain inet {name} {chain} {{ type {kind} hook {hook} priority {prio} ; }}")
        lines.append(f"add chain inet {name} istio-prerouting")
        lines.append(f"add chain inet {name} istio-output")

    def rule(tbl: str, chain: str, body: str) -> None:
        lines.append(f"add rule inet {tbl} {chain} {body}")

    def per_family(tbl: str, chain: str, template: str, *, first_v4: str | None = None) -> None:
        for fam in fams:
            ip = "ip" if fam is Family.V4 else "ip6"
            body = template.format(ip=ip, lo=fam.loopback, snat=settings.snat(fam))
            if fam is Family.V4 and first_v4 is not None:
                body = first_v4.format(ip=ip, lo=fam.loopback, snat=settings.snat(fam))
            rule(tbl, chain, body)

    mark_ne = f"mark and {INPOD_MASK:#x} != {INPOD_MARK:#x}"
    nat = "istio-ambient-nat"
    table(nat, (("prerouting", "nat", "prerouting", -100), ("output", "nat", "output", -100)))
    rule(nat, "output", "jump istio-output")
    rule(nat, "prerouting", "jump istio-prerouting")
    for ifname in redirect.virtual_interfaces:
        rule(
            nat,
            "istio-prerouting",
            f"iifname {ifname} meta l4proto tcp counter redirect to :{ZTUNNEL_OUTBOUND_PORT}",
        )
        rule(nat, "istio-prerouting", f"iifname {ifname} meta l4proto tcp counter return")
    if not ingress:
        per_family(nat, "istio-prerouting", "meta l4proto tcp {ip} saddr {snat} counter accept")
    per_family(nat, "istio-output", "meta l4proto tcp {ip} daddr {snat} counter accept")
    if not ingress:
        tmpl = (
            f"{{ip}} daddr != {{lo}} tcp dport != {ZTUNNEL_INBOUND_PORT} {mark_ne} "
            f"counter redirect to :{ZTUNNEL_INBOUND_PLAINTEXT_PORT}"
        )
        # upstream's v4 line carries a double space before "!=": kept so the text matches its golden file
        per_family(nat, "istio-prerouting", tmpl, first_v4=tmpl.replace(" != 0x539", "  != 0x539"))
    if dns:
        rule(
            nat,
            "istio-output",
            f"oifname != lo {mark_ne} udp dport 53 counter redirect to :{DNS_CAPTURE_PORT}",
        )
        per_family(
            nat,
            "istio-output",
            f"{{ip}} daddr != {{lo}} tcp dport 53 {mark_ne} counter redirect to :{DNS_CAPTURE_PORT}",
        )
    rule(
        nat,
        "istio-output",
        f"meta l4proto tcp mark and {INPOD_TPROXY_MASK:#x} == {INPOD_TPROXY_MARK:#x} counter accept",
    )
    per_family(nat, "istio-output", "oifname lo {ip} daddr != {lo} counter accept")
    per_family(
        nat,
        "istio-output",
        f"meta l4proto tcp {{ip}} daddr != {{lo}} {mark_ne} counter redirect to :{ZTUNNEL_OUTBOUND_PORT}",
    )

    mangle = "istio-ambient-mangle"
    table(mangle, (("prerouting", "filter", "prerouting", -150), ("output", "route", "output", -150)))
    rule(mangle, "prerouting", "jump istio-prerouting")
    rule(mangle, "output", "jump istio-output")
    if not ingress or settings.ingress_keeps_connmark:
        rule(
            mangle,
            "istio-prerouting",
            f"meta mark & {INPOD_MASK:#x} == {INPOD_MARK:#x} counter ct mark set ct mark & 0xfffff000 |  "
            f"{INPOD_TPROXY_MARK:#x}",
        )
    rule(
        mangle,
        "istio-output",
        f"ct mark and {INPOD_TPROXY_MASK:#x} == {INPOD_TPROXY_MARK:#x} counter meta mark set ct mark",
    )

    if dns:
        raw = "istio-ambient-raw"
        table(raw, (("prerouting", "filter", "prerouting", -300), ("output", "filter", "output", -300)))
        rule(raw, "prerouting", "jump istio-prerouting")
        rule(raw, "output", "jump istio-output")
        rule(
            raw,
            "istio-output",
            f"udp dport 53 meta mark and {INPOD_MASK:#x} == {INPOD_MARK:#x} counter ct zone set 1",
        )
        rule(raw, "istio-prerouting", f"udp sport 53 {'meta ' + mark_ne} counter ct zone set 1")
    return "\n".join(lines) + "\n"


def render_nft_delete(*, present: frozenset[str] | None = None) -> str:
    """An `nft -f` script deleting our tables. Without `present`, each table is added first so the delete
    cannot fail on an absent table (nft 1.0.6 has no `destroy`); with it, only tables present are deleted."""
    lines: list[str] = []
    for name in NFT_TABLES:
        if present is None:
            lines.append(f"add table inet {name}")
            lines.append(f"delete table inet {name}")
        elif name in present:
            lines.append(f"delete table inet {name}")
    return "\n".join(lines) + ("\n" if lines else "")
