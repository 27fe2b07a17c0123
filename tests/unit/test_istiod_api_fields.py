"""The generated classes carry upstream's package names and field numbers: what makes a real istiod
or a real ztunnel interoperate with ours."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor

from shared.api import authorization_pb2, ca_pb2, discovery_pb2, workload_pb2


def numbers(desc: Descriptor) -> dict[str, int]:
    return {f.name: f.number for f in desc.fields}


@pytest.mark.parametrize(
    ("desc", "expected"),
    [
        (workload_pb2.Address.DESCRIPTOR, {"workload": 1, "service": 2}),
        (
            workload_pb2.Workload.DESCRIPTOR,
            {
                "uid": 20,
                "name": 1,
                "namespace": 2,
                "addresses": 3,
                "hostname": 21,
                "network": 4,
                "tunnel_protocol": 5,
                "trust_domain": 6,
                "service_account": 7,
                "waypoint": 8,
                "network_gateway": 19,
                "node": 9,
                "canonical_name": 10,
                "canonical_revision": 11,
                "workload_type": 12,
                "workload_name": 13,
                "native_tunnel": 14,
                "application_tunnel": 23,
                "services": 22,
                "authorization_policies": 16,
                "status": 17,
                "cluster_id": 18,
                "locality": 24,
                "network_mode": 25,
                "extensions": 26,
                "capacity": 27,
            },
        ),
        (
            workload_pb2.Service.DESCRIPTOR,
            {
                "name": 1,
                "namespace": 2,
                "hostname": 3,
                "addresses": 4,
                "ports": 5,
                "subject_alt_names": 6,
                "waypoint": 7,
                "load_balancing": 8,
                "ip_families": 9,
                "extensions": 10,
                "canonical": 11,
                "ingress_use_waypoint": 12,
            },
        ),
        (workload_pb2.GatewayAddress.DESCRIPTOR, {"hostname": 1, "address": 2, "hbone_mtls_port": 3}),
        (workload_pb2.NetworkAddress.DESCRIPTOR, {"network": 1, "address": 2, "length": 3}),
        (workload_pb2.Port.DESCRIPTOR, {"service_port": 1, "target_port": 2, "app_protocol": 3}),
        (
            authorization_pb2.Authorization.DESCRIPTOR,
            {"name": 1, "namespace": 2, "scope": 3, "action": 4, "rules": 5, "dry_run": 6, "extensions": 7},
        ),
        (authorization_pb2.Rule.DESCRIPTOR, {"clauses": 1}),
        (authorization_pb2.Clause.DESCRIPTOR, {"matches": 2}),
        (
            authorization_pb2.Match.DESCRIPTOR,
            {
                "namespaces": 1,
                "not_namespaces": 2,
                "principals": 3,
                "not_principals": 4,
                "source_ips": 5,
                "not_source_ips": 6,
                "destination_ips": 7,
                "not_destination_ips": 8,
                "destination_ports": 9,
                "not_destination_ports": 10,
                "service_accounts": 11,
                "not_service_accounts": 12,
                "extensions": 13,
            },
        ),
        (authorization_pb2.StringMatch.DESCRIPTOR, {"exact": 1, "prefix": 2, "suffix": 3, "presence": 4}),
        (authorization_pb2.Address.DESCRIPTOR, {"address": 1, "length": 2}),
        (ca_pb2.IstioCertificateRequest.DESCRIPTOR, {"csr": 1, "validity_duration": 3, "metadata": 4}),
        (ca_pb2.IstioCertificateResponse.DESCRIPTOR, {"cert_chain": 1}),
        (
            discovery_pb2.DeltaDiscoveryRequest.DESCRIPTOR,
            {
                "node": 1,
                "type_url": 2,
                "resource_names_subscribe": 3,
                "resource_names_unsubscribe": 4,
                "initial_resource_versions": 5,
                "response_nonce": 6,
                "error_detail": 7,
            },
        ),
        (
            discovery_pb2.DeltaDiscoveryResponse.DESCRIPTOR,
            {"system_version_info": 1, "resources": 2, "type_url": 4, "removed_resources": 6, "nonce": 5},
        ),
        (
            discovery_pb2.Resource.DESCRIPTOR,
            {"name": 3, "aliases": 4, "version": 1, "resource": 2, "ttl": 6, "cache_control": 7},
        ),
    ],
)
def test_field_numbers_match_upstream(desc: Descriptor, expected: dict[str, int]) -> None:
    assert numbers(desc) == expected


def test_full_names_and_services() -> None:
    assert workload_pb2.Address.DESCRIPTOR.full_name == "istio.workload.Address"
    assert authorization_pb2.Authorization.DESCRIPTOR.full_name == "istio.security.Authorization"
    assert ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"].full_name == (
        "istio.v1.auth.IstioCertificateService"
    )
    ads = discovery_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"]
    assert ads.full_name == "envoy.service.discovery.v3.AggregatedDiscoveryService"
    method = ads.methods_by_name["DeltaAggregatedResources"]
    assert method.input_type.full_name == "envoy.service.discovery.v3.DeltaDiscoveryRequest"
    node = discovery_pb2.DeltaDiscoveryRequest.DESCRIPTOR.fields_by_name["node"].message_type
    assert node.full_name == "envoy.config.core.v3.Node"
    status = discovery_pb2.DeltaDiscoveryRequest.DESCRIPTOR.fields_by_name["error_detail"].message_type
    assert status.full_name == "google.rpc.Status"


def test_enum_values_match_upstream() -> None:
    assert (workload_pb2.NONE, workload_pb2.HBONE, workload_pb2.LEGACY_ISTIO_MTLS) == (0, 1, 2)
    assert (workload_pb2.DEPLOYMENT, workload_pb2.CRONJOB, workload_pb2.POD, workload_pb2.JOB) == (0, 1, 2, 3)
    assert (workload_pb2.HEALTHY, workload_pb2.UNHEALTHY) == (0, 1)
    assert (workload_pb2.STANDARD, workload_pb2.HOST_NETWORK) == (0, 1)
    assert (authorization_pb2.GLOBAL, authorization_pb2.NAMESPACE, authorization_pb2.WORKLOAD_SELECTOR) == (
        0,
        1,
        2,
    )
    assert (authorization_pb2.ALLOW, authorization_pb2.DENY) == (0, 1)
