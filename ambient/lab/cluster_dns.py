"""The lab's cluster DNS ("kube-dns"): dnsmasq in the control-plane netns at a fixed VIP, fed from the world.

Theory of operation
-------------------
dnsmasq listens on `KUBE_DNS_VIP` only (an address on the control plane's loopback; every node routes it
there) and knows exactly what the world says: service hostnames -> VIPs, a headless service's hostname ->
its endpoints' addresses, one hosts file in its `hostsdir` that it re-reads by itself when the lab rewrites
it (after every world change the lab makes). It has no upstream: `no-resolv` and no `server=` line, so it
never forwards a query anywhere; names under `cluster.local` it does not know are NXDOMAIN (`local=`), any
other name REFUSED. Every query it sees is logged (`log-queries`) to the lab's logs.

Every pod's resolv.conf (`/etc/netns/<pod netns>/resolv.conf`, which `ip netns exec` puts in place) names
the VIP with Kubernetes' search list and ndots:5; the nodes' resolv.conf names the VIP too, so what
ztunnel forwards goes to dnsmasq and never to the host's resolvers.

All of this module is pure rendering except `write_hosts`.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from services.istiod.world import World

KUBE_DNS_VIP = "10.96.255.10"
"""The cluster DNS's fixed address (inside the lab's service range, 10.96.0.0/16; no world service may
take it)."""
CLUSTER_DOMAIN = "cluster.local"


def pod_resolv_conf(namespace: str, *, domain: str = CLUSTER_DOMAIN) -> str:
    """A pod's resolv.conf, as the kubelet writes it for `dnsPolicy: ClusterFirst`."""
    return (f"# written by the trio-ambient lab: the cluster DNS\nnameserver {KUBE_DNS_VIP}\n"
            f"search {namespace}.svc.{domain} svc.{domain} {domain}\noptions ndots:5\n")


def node_resolv_conf() -> str:
    """A node's resolv.conf: the cluster DNS only (ztunnel forwards what it does not answer there)."""
    return (f"# written by the trio-ambient lab: the cluster DNS, and nothing outside the lab\n"
            f"nameserver {KUBE_DNS_VIP}\n")


def hosts_file(world: World) -> str:
    """dnsmasq's view of the world: one `address hostname` line per service VIP, or per endpoint address of
    a headless service (a service without VIPs)."""
    lines = ["# written by the trio-ambient lab from the world: service hostnames -> VIPs "
             "(headless services: their endpoints)"]
    for svc in world.services:
        hostname = world.service_hostname(svc)
        addresses = list(svc.vips)
        if not addresses and svc.selector:
            addresses = [ip for pod in world.pods if pod.namespace == svc.namespace
                         and all(pod.labels.get(k) == v for k, v in svc.selector.items()) for ip in pod.ips]
        lines += [f"{ipaddress.ip_address(ip)}\t{hostname}" for ip in dict.fromkeys(addresses)]
    return "\n".join(lines) + "\n"


def dnsmasq_conf(*, hosts_dir: Path, query_log: Path, domain: str = CLUSTER_DOMAIN) -> str:
    """dnsmasq's configuration: the VIP only, the world's names only, no upstream at all."""
    return "\n".join([
        "# written by the trio-ambient lab: the cluster DNS; it has no upstream and never forwards",
        "no-resolv",
        "no-poll",
        "no-hosts",
        "bind-interfaces",
        f"listen-address={KUBE_DNS_VIP}",
        "port=53",
        f"local=/{domain}/",
        "domain-needed",
        "bogus-priv",
        f"hostsdir={hosts_dir}",
        "log-queries",
        f"log-facility={query_log}",
        "keep-in-foreground",
        "pid-file=",
        "user=root",
        "group=root",
        "",
    ])


def write_hosts(hosts_dir: Path, world: World) -> None:
    """Replace dnsmasq's hosts file with the world's (a rename, so dnsmasq never reads half a file)."""
    hosts_dir.mkdir(parents=True, exist_ok=True)
    tmp = hosts_dir.parent / "world.hosts.tmp"
    tmp.write_text(hosts_file(world))
    os.replace(tmp, hosts_dir / "world.hosts")
