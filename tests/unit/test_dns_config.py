"""The DNS proxy's settings: the resolv.conf it forwards to, and the proxy-metadata switch."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.ztunnel.config import load_config
from services.ztunnel.dns.forwarder import read_nameservers
from services.ztunnel.errors import ConfigError


def test_nameservers_in_order_with_junk_skipped() -> None:
    text = ("# generated\nsearch default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\n"
            "nameserver fe80::1%eth0 ; link-local\nnameserver not-an-ip\nnameserver\noptions ndots:5\n"
            "  nameserver 10.96.0.11 # second\n")
    assert read_nameservers(text) == ("10.96.0.10", "fe80::1", "10.96.0.11")


def test_dns_proxy_is_on_by_default_and_reads_the_named_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\n")
    proxy = load_config({"DNS_RESOLV_CONF": str(conf)}).proxy
    assert proxy.dns_capture is True and proxy.dns_upstreams == ("127.0.0.53",)
    off = load_config({"DNS_RESOLV_CONF": str(conf), "ISTIO_META_DNS_CAPTURE": "false"}).proxy
    assert off.dns_capture is False


def test_a_missing_named_resolv_conf_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DNS_RESOLV_CONF"):
        load_config({"DNS_RESOLV_CONF": str(tmp_path / "nope")})
