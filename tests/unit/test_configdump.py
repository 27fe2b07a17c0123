"""The upstream-schema conversions of /config_dump for what istioctl's tables do not show (tests/service/
test_istioctl_dump.py runs the real istioctl on a whole dump)."""

from __future__ import annotations

from services.ztunnel import configdump
from services.ztunnel.state.types import (
    Action,
    Authorization,
    Clause,
    GatewayAddress,
    Match,
    NamespacedHostname,
    NetworkAddress,
    PolicyKey,
    Port,
    Rule,
    Scope,
    Service,
    ServiceAccountMatch,
    ServiceKey,
    StringMatch,
    TunnelProtocol,
    Workload,
    WorkloadType,
    WorkloadUid,
)
from services.ztunnel.telemetry.access_log import ConnectionOutcome, OpenConnections, Peer
from shared.logs import Display
from shared.zds.types import PodUid, WorkloadInfo


def test_workload_fields_and_what_is_left_out_when_empty() -> None:
    east = GatewayAddress(address=NetworkAddress(network="east", address="192.0.2.1"), hbone_mtls_port=15008)
    waypoint = GatewayAddress(hostname=NamespacedHostname(namespace="ns", hostname="wp.ns.svc.cluster.local"),
                              hbone_mtls_port=15009)
    ports = (Port(service_port=80, target_port=8080),)
    wl = Workload(uid=WorkloadUid("Kubernetes//Pod/ns/a"), name="a", namespace="ns", addresses=("10.0.0.1",),
                  network="west", tunnel_protocol=TunnelProtocol.HBONE, waypoint=waypoint,
                  network_gateway=east, workload_type=WorkloadType.POD, workload_name="a", canonical_name="a",
                  healthy=False, host_network=True, native_tunnel=True,
                  authorization_policies=(PolicyKey("ns/p"),),
                  services={ServiceKey("ns/s.ns.svc.cluster.local"): ports})
    assert configdump.workload(wl) == {
        "workloadIps": ["10.0.0.1"],
        "waypoint": {"destination": "ns/wp.ns.svc.cluster.local", "hboneMtlsPort": 15009},
        "networkGateway": {"destination": "east/192.0.2.1", "hboneMtlsPort": 15008},
        "protocol": "HBONE", "networkMode": "HostNetwork",
        "uid": "Kubernetes//Pod/ns/a", "name": "a", "namespace": "ns",
        "trustDomain": "cluster.local", "serviceAccount": "default", "network": "west",
        "workloadName": "a", "workloadType": "pod", "canonicalName": "a",
        "nativeTunnel": True, "authorizationPolicies": ["ns/p"], "status": "Unhealthy", "clusterId": "",
        "services": ["ns/s.ns.svc.cluster.local"],
    }
    bare = configdump.workload(Workload(uid=WorkloadUid("u"), name="b", namespace="ns",
                                        tunnel_protocol=TunnelProtocol.LEGACY_ISTIO_MTLS))
    assert bare["protocol"] == "LEGACY_ISTIO_MTLS" and bare["networkMode"] == "Standard"
    assert not {"waypoint", "network", "node", "hostname", "nativeTunnel", "services"} & bare.keys()


def test_service_endpoints_carry_each_workloads_ports_and_health() -> None:
    svc = Service(name="s", namespace="ns", hostname="s.ns.svc.cluster.local",
                  addresses=(NetworkAddress(address="10.96.0.1"),),
                  ports=(Port(service_port=80, target_port=0),),
                  subject_alt_names=("spiffe://cluster.local/ns/ns/sa/s",))
    wl = Workload(uid=WorkloadUid("w"), name="w", namespace="ns", healthy=False,
                  services={svc.key: (Port(service_port=80, target_port=8080),)})
    assert configdump.service(svc, [wl]) == {
        "name": "s", "namespace": "ns", "hostname": "s.ns.svc.cluster.local", "vips": ["/10.96.0.1"],
        "ports": {"80": 0}, "subjectAltNames": ["spiffe://cluster.local/ns/ns/sa/s"],
        "endpoints": {"w": {"workloadUid": "w", "port": {"80": 8080}, "status": "Unhealthy"}},
    }


def test_policy_matches_in_upstreams_spelling() -> None:
    match = Match(namespaces=(StringMatch(kind="prefix", value="team-"),),
                  not_principals=(StringMatch(kind="presence"),),
                  service_accounts=(ServiceAccountMatch(namespace="ns", service_account="sa"),),
                  destination_ports=(80,), not_source_ips=("10.0.0.0/8",))
    pol = Authorization(name="p", namespace="istio-system", scope=Scope.GLOBAL, action=Action.DENY,
                        dry_run=True, rules=(Rule(clauses=(Clause(matches=(match, Match())),)),))
    assert configdump.policy(pol) == {
        "name": "p", "namespace": "istio-system", "scope": "Global", "action": "Deny", "dryRun": True,
        "rules": [[[{"namespaces": [{"Prefix": "team-"}], "notPrincipals": [{"Presence": []}],
                     "serviceAccounts": [{"namespace": "ns", "serviceAccount": "sa"}],
                     "destinationPorts": [80], "notSourceIps": ["10.0.0.0/8"]}, {}]]],
    }


def test_workload_state_up_and_pending() -> None:
    info = WorkloadInfo(name="a", namespace="ns", service_account="sa")
    assert configdump.workload_state({PodUid("u2"): info}, {PodUid("u1"): info}, {}) == {
        "u1": {"state": "Pending", "info": {"name": "a", "namespace": "ns", "serviceAccount": "sa"}},
        "u2": {"state": "Up", "connections": {"inbound": [], "outbound": []},
               "info": {"name": "a", "namespace": "ns", "serviceAccount": "sa"}},
    }


def open_connections() -> OpenConnections:
    """A pod's four kinds of open connection, as the proxies make their outcomes."""
    hbone_out = ConnectionOutcome(direction="outbound", src_addr=Display("10.244.1.10:40000"),
                                  dst_addr=Display("10.244.2.12:15008"),
                                  dst_hbone_addr=Display("10.244.2.12:9080"))
    hbone_out.original = ("10.96.0.13", 9080)
    passthrough = ConnectionOutcome(direction="outbound", src_addr=Display("10.244.1.10:40002"),
                                    dst_addr=Display("1.2.3.4:443"))
    passthrough.original = ("::ffff:1.2.3.4", 443)
    bare = ConnectionOutcome(direction="outbound", src_addr=Display("10.244.1.10:40004"),
                             dst_addr=Display("1.2.3.5:80"))  # no xDS: the original is the destination
    hbone_in = ConnectionOutcome(direction="inbound", src_addr=Display("10.244.2.12:50000"),
                                 dst_addr=Display("10.244.1.10:15008"),
                                 dst_hbone_addr=Display("10.244.1.10:9080"),
                                 src=Peer(identity="spiffe://cluster.local/ns/b/sa/r"))
    hbone_in.for_host = "productpage.bookinfo.svc.cluster.local"
    plain_in = ConnectionOutcome(direction="inbound", src_addr=Display("10.244.1.30:50002"),
                                 dst_addr=Display("10.244.1.10:9080"))
    held = OpenConnections()
    for outcome in (hbone_out, hbone_in, passthrough, plain_in, bare):
        held.add(outcome)
    return held


def test_open_connections_in_upstreams_shape() -> None:
    assert configdump.connections(open_connections()) == {
        "inbound": [
            {"src": "10.244.2.12:50000", "originalDst": "productpage.bookinfo.svc.cluster.local",
             "actualDst": "10.244.1.10:9080", "protocol": "HBONE"},
            {"src": "10.244.1.30:50002", "originalDst": None, "actualDst": "10.244.1.10:9080",
             "protocol": "TCP"},
        ],
        "outbound": [
            {"src": "10.244.1.10:40000", "originalDst": "10.96.0.13:9080", "actualDst": "10.244.2.12:15008",
             "protocol": "HBONE"},
            {"src": "10.244.1.10:40002", "originalDst": "1.2.3.4:443", "actualDst": "1.2.3.4:443",
             "protocol": "TCP"},
            {"src": "10.244.1.10:40004", "originalDst": "1.2.3.5:80", "actualDst": "1.2.3.5:80",
             "protocol": "TCP"},
        ],
    }
    assert configdump.connections(None) == {"inbound": [], "outbound": []}


def test_workload_state_lists_each_running_pods_own_connections() -> None:
    info = WorkloadInfo(name="a", namespace="ns", service_account="sa")
    held = open_connections()
    state = configdump.workload_state({PodUid("u1"): info, PodUid("u2"): info}, {}, {PodUid("u1"): held})
    assert state["u1"]["connections"] == configdump.connections(held)
    assert state["u2"]["connections"] == {"inbound": [], "outbound": []}
