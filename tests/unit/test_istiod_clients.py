"""Client-side settings: GrpcTarget.from_env (upstream env names), the xDS node identity, the store dump."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.istiod.ca import CertificateAuthority
from services.ztunnel.config import load_config
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import NetworkAddress, Service, Workload, WorkloadUid
from services.ztunnel.xds.client import XdsClientConfig
from shared.aio import GrpcTarget, client_tls_context


def test_target_from_env(tmp_path: Path) -> None:
    root = tmp_path / "root.pem"
    root.write_text(CertificateAuthority.create().root_pem)
    token = tmp_path / "token"
    token.write_text("tok\n")
    env = {
        "XDS_ADDRESS": "https://istiod.example:15012",
        "XDS_ROOT_CERT": str(root),
        "XDS_TOKEN_FILE": str(token),
        "XDS_HEADER_X_TEAM": "a",
    }
    target = GrpcTarget.from_env("XDS", env)
    assert (target.host, target.port, target.token) == ("istiod.example", 15012, "tok")
    assert target.root_cert_pem == root.read_text()
    assert target.call_metadata() == {"x-team": "a", "authorization": "Bearer tok"}
    plain = GrpcTarget.from_env(
        "CA", {"CA_ADDRESS": "http://127.0.0.1:1500", "CA_TOKEN_FILE": "/nonexistent"}
    )
    assert (plain.root_cert_pem, plain.token, plain.port) == (None, None, 1500)
    with pytest.raises(ValueError, match="is not"):
        GrpcTarget.from_env("XDS", {"XDS_ADDRESS": "istiod"})
    with pytest.raises(ValueError, match="is not a PEM certificate"):
        GrpcTarget.from_env("XDS", {"XDS_ADDRESS": "h:1", "XDS_ROOT_CERT": str(token)})
    with pytest.raises(ValueError, match="cannot read the root certificate"):
        GrpcTarget.from_env("XDS", {"XDS_ADDRESS": "h:1", "XDS_ROOT_CERT": "/nonexistent"})


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_root_certificate_is_refused_never_the_system_store(tmp_path: Path, content: str) -> None:
    empty = tmp_path / "root.pem"
    empty.write_text(content)
    with pytest.raises(ValueError, match=f"^CA_ROOT_CERT {re.escape(str(empty))} is empty; .*never used"):
        GrpcTarget.from_env("CA", {"CA_ADDRESS": "h:1", "CA_ROOT_CERT": str(empty)})
    with pytest.raises(ValueError, match=r"^XDS_ROOT_CERT is set but empty"):
        GrpcTarget.from_env("XDS", {"XDS_ADDRESS": "h:1", "XDS_ROOT_CERT": ""})
    with pytest.raises(ValueError, match="refusing to trust the system store"):
        client_tls_context(content)
    unreadable = tmp_path / "dir.pem"
    unreadable.mkdir()
    with pytest.raises(ValueError, match="cannot read the root certificate"):
        GrpcTarget.from_env("XDS", {"XDS_ADDRESS": "h:1", "XDS_ROOT_CERT": str(unreadable)})


def test_node_identity_from_env() -> None:
    config = XdsClientConfig.for_ztunnel(
        load_config(
            {
                "INSTANCE_IP": "10.0.0.5",
                "POD_NAME": "ztunnel-x",
                "POD_NAMESPACE": "istio-system",
                "NODE_NAME": "n1",
            }
        )
    )
    assert config.node_id == "ztunnel~10.0.0.5~ztunnel-x.istio-system~istio-system.svc.cluster.local"
    assert config.node_metadata["NODE_NAME"] == "n1"
    assert config.node_metadata["INSTANCE_IPS"] == "10.0.0.5"


def test_store_indexes_follow_replacements_and_removals() -> None:
    store = StateStore()
    wl = Workload(uid=WorkloadUid("u1"), name="a", namespace="ns", addresses=("10.0.0.1",))
    svc = Service(
        name="s", namespace="ns", hostname="s.ns.svc", addresses=(NetworkAddress(address="10.96.0.1"),)
    )
    store.apply_addresses([wl, svc], [])
    assert store.workload_by_ip("10.0.0.1") == wl
    assert store.service_by_vip("10.96.0.1") == svc
    moved = Workload(uid=WorkloadUid("u1"), name="a", namespace="ns", addresses=("10.0.0.2",))
    store.apply_addresses([moved], [])
    assert store.workload_by_ip("10.0.0.1") is None and store.workload_by_ip("10.0.0.2") == moved
    store.apply_addresses([], ["u1", "ns/s.ns.svc"])
    assert store.workloads == {} and store.services == {} and store.service_by_vip("10.96.0.1") is None
    assert store.generation == 3


def test_pod_info_enablement_matches_spec_section_8() -> None:
    from services.node_agent.podwatch import PodInfo

    def info(
        labels: dict[str, str],
        ns: dict[str, str],
        *,
        annotations: dict[str, str] | None = None,
        host: bool = False,
    ) -> PodInfo:
        return PodInfo(
            uid="u",
            name="p",
            namespace="ns",
            service_account="sa",
            node="n",
            ips=("10.0.0.1",),
            labels=labels,
            annotations=annotations or {},
            namespace_labels=ns,
            host_network=host,
        )

    mode = "istio.io/dataplane-mode"
    assert info({mode: "ambient"}, {}).is_ambient
    assert info({}, {mode: "ambient"}).is_ambient
    assert not info({mode: "none"}, {mode: "ambient"}).is_ambient
    assert not info({}, {}).is_ambient
    assert not info({mode: "ambient"}, {}, annotations={"sidecar.istio.io/status": "{}"}).is_ambient
    assert not info({mode: "ambient"}, {}, host=True).is_ambient


ROOT_PEM = CertificateAuthority.create().root_pem


def test_ztunnel_reads_upstreams_root_and_token_names(tmp_path: Path) -> None:
    root = tmp_path / "root-cert.pem"
    root.write_text(ROOT_PEM)  # read back as-is
    token = tmp_path / "istio-token"
    token.write_text("tok-123")
    config = load_config({"XDS_ADDRESS": "https://127.0.0.1:15012", "XDS_ROOT_CA": str(root),
                          "CA_ROOT_CA": str(root), "AUTH_TOKEN": str(token)})
    assert config.xds_target is not None and config.ca_target is not None
    assert config.xds_target.root_cert_pem == ROOT_PEM and config.ca_target.root_cert_pem == ROOT_PEM
    assert config.xds_target.token == "tok-123" and config.ca_target.token == "tok-123"


def test_ztunnel_refuses_upstreams_system_root() -> None:
    from services.ztunnel.errors import ConfigError

    with pytest.raises(ConfigError, match="XDS_ROOT_CA=SYSTEM"):
        load_config({"XDS_ADDRESS": "https://127.0.0.1:15012", "XDS_ROOT_CA": "SYSTEM"})
