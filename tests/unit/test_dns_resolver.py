"""The DNS proxy's resolver over the xDS state: search-list forms, families, headless services and their
pod hostnames, NXDOMAIN under the cluster domain, ServiceEntry-like hosts, everything else forwarded."""

from __future__ import annotations

from services.ztunnel.dns.resolver import Forward, NxDomain, Records, Resolver
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import NetworkAddress, Port, Service, ServiceKey, Workload, WorkloadUid

PRODUCTPAGE = Service(name="productpage", namespace="bookinfo",
                      hostname="productpage.bookinfo.svc.cluster.local",
                      addresses=(NetworkAddress(address="10.96.0.20"), NetworkAddress(address="fd00::20")))
DB = Service(name="db", namespace="data", hostname="db.data.svc.cluster.local")  # headless
EXTERNAL = Service(name="api", namespace="bookinfo", hostname="api.example.com",
                   addresses=(NetworkAddress(address="240.240.0.1"),))
DB_KEY = ServiceKey("data/db.data.svc.cluster.local")


def db_pod(name: str, ip: str, *, hostname: str = "", healthy: bool = True) -> Workload:
    return Workload(uid=WorkloadUid(f"Kubernetes//Pod/data/{name}"), name=name, namespace="data",
                    addresses=(ip,), hostname=hostname, healthy=healthy,
                    services={DB_KEY: (Port(service_port=5432, target_port=5432),)})


def resolver() -> Resolver:
    store = StateStore()
    store.apply_addresses([PRODUCTPAGE, DB, EXTERNAL, db_pod("db-0", "10.1.0.5", hostname="primary"),
                           db_pod("db-1", "10.1.0.6"), db_pod("db-2", "10.1.0.7", healthy=False)], [])
    return Resolver(store)


def test_service_fqdn_answers_its_vip_by_family() -> None:
    r = resolver()
    assert r.resolve("productpage.bookinfo.svc.cluster.local.", "A") == Records(addresses=("10.96.0.20",))
    assert r.resolve("ProductPage.Bookinfo.svc.Cluster.Local", "AAAA") == Records(addresses=("fd00::20",))


def test_search_list_short_forms() -> None:
    r = resolver()
    vip = Records(addresses=("10.96.0.20",))
    assert r.resolve("productpage", "A", client_namespace="bookinfo") == vip
    assert r.resolve("productpage.bookinfo", "A", client_namespace="default") == vip
    assert r.resolve("productpage.bookinfo.svc", "A", client_namespace="default") == vip
    # the bare name is the client's namespace's: from another namespace it is not ours to answer
    assert r.resolve("productpage", "A", client_namespace="default") == Forward()


def test_what_the_search_list_appends_past_the_right_form_does_not_exist() -> None:
    r = resolver()
    assert r.resolve("productpage.bookinfo.bookinfo.svc.cluster.local", "A") == NxDomain()
    assert r.resolve("productpage.bookinfo.cluster.local", "A") == NxDomain()
    assert r.resolve("nosuch.bookinfo.svc.cluster.local", "AAAA") == NxDomain()
    assert r.resolve("cluster.local", "A") == NxDomain()


def test_known_name_without_that_family_or_type_is_an_empty_answer() -> None:
    r = resolver()
    assert r.resolve("api.example.com", "AAAA") == Records(addresses=())
    assert r.resolve("productpage.bookinfo.svc.cluster.local", "TXT") == Records(addresses=())


def test_service_entry_like_host_answers_and_other_names_are_forwarded() -> None:
    r = resolver()
    assert r.resolve("api.example.com", "A") == Records(addresses=("240.240.0.1",))
    assert r.resolve("www.example.com", "A") == Forward()
    assert r.resolve("example", "A", client_namespace="bookinfo") == Forward()


def test_headless_service_answers_its_healthy_endpoints() -> None:
    assert resolver().resolve("db.data", "A") == Records(addresses=("10.1.0.5", "10.1.0.6"))


def test_pod_hostname_of_a_headless_service() -> None:
    r = resolver()
    assert r.resolve("primary.db.data.svc.cluster.local", "A") == Records(addresses=("10.1.0.5",))
    assert r.resolve("db-1.db.data.svc.cluster.local", "A") == Records(addresses=("10.1.0.6",))
    assert r.resolve("db-0.db.data.svc.cluster.local", "A") == NxDomain()  # its hostname is "primary"
    # a service with a VIP has no per-pod names
    assert r.resolve("x.productpage.bookinfo.svc.cluster.local", "A") == NxDomain()


def test_state_changes_are_answered_at_once() -> None:
    store = StateStore()
    r = Resolver(store)
    assert r.resolve("reviews.bookinfo.svc.cluster.local", "A") == NxDomain()
    store.apply_addresses([Service(name="reviews", namespace="bookinfo",
                                   hostname="reviews.bookinfo.svc.cluster.local",
                                   addresses=(NetworkAddress(address="10.96.0.30"),))], [])
    assert r.resolve("reviews.bookinfo.svc.cluster.local", "A") == Records(addresses=("10.96.0.30",))
    store.apply_addresses([], ["bookinfo/reviews.bookinfo.svc.cluster.local"])
    assert r.resolve("reviews.bookinfo.svc.cluster.local", "A") == NxDomain()
    assert r.resolve("reviews.bookinfo", "A") == Forward()  # a short form nobody knows: maybe not ours
