"""The processes of the lab: how each is started, where it logs, how the lab knows it is ready.

This is the one place that knows the components' command lines, environment and readiness endpoints:

    istiod      control-plane netns   python -m services.istiod.app --world ... --listen 0.0.0.0:15012
                                      ready: TCP 15012 accepts
    cluster-dns control-plane netns   dnsmasq --conf-file <run>/cluster-dns/dnsmasq.conf (cluster_dns.py)
                                      ready: TCP 53 on the kube-dns VIP accepts
    node-agent  node netns            python -m services.node_agent.app (NODE_NAME, ZTUNNEL_UDS_ADDRESS, ...)
                                      ready: GET /healthz on its CNI-event Unix socket answers 200
    ztunnel     node netns            python -m services.ztunnel.app (upstream's environment variables),
                                      or a build of istio/ztunnel (`--ztunnel-bin`, upstream.py)
                                      ready: GET :15021/healthz/ready answers 200 (any answer while no
                                      node agent runs: without one it can never get its snapshot)
    app         pod netns             python -m services.apps.server KIND --port P
                                      ready: TCP 127.0.0.1:P accepts inside the pod

A component whose module is not installed yet is skipped with a note (`available()`), so the lab can be
built while the mesh's pieces land. Processes run as `ip netns exec <netns> python -m ...` in their own
session, log to <run>/logs/<name>.log and are recorded with PID and start time; they are stopped by that
PID only.

ztunnel and the node agent find their credentials as upstream does, relative to their working directory
(<run>/<node>/): ./var/run/secrets/tokens/istio-token and ./var/run/secrets/istio/root-cert.pem.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ambient.lab import upstream
from ambient.lab.cluster_dns import KUBE_DNS_VIP, dnsmasq_conf
from ambient.lab.errors import ComponentError
from ambient.lab.probe import http_get, tcp_probe, unix_http
from ambient.lab.state import (
    Check,
    ComponentSpec,
    HttpCheck,
    ProcessRecord,
    TcpCheck,
    UnixHttpCheck,
    is_running,
    process_start_time,
)
from ambient.lab.topology import ETC_NETNS, ISTIOD_PORT, WAYPOINT_PROGRAM, LabPlan, NodePlan, PodPlan
from shared.netns import NetnsError
from shared.secretfile import write_secret

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

MODULES = {
    "istiod": "services.istiod.app",
    "node-agent": "services.node_agent.app",
    "ztunnel": "services.ztunnel.app",
    "app": "services.apps.server",
    "waypoint": "services.waypoint.app",
}
ZTUNNEL_READY_PORT = 15021
ZTUNNEL_ADMIN_PORT = 15000
NODE_AGENT_HEALTH_PORT = 8000  # HEALTH_ADDR inside the node netns: /healthz, /metrics, /verify
TOKEN_PATH = "var/run/secrets/tokens/istio-token"
ROOT_CERT_PATH = "var/run/secrets/istio/root-cert.pem"


def available(component: str) -> bool:
    """True when the component's module is installed (the mesh's pieces land one by one)."""
    try:
        return importlib.util.find_spec(MODULES[component]) is not None
    except ModuleNotFoundError:
        return False


class LabPaths:
    """Where a lab's files live under its run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def world(self) -> Path:
        return self.run_dir / "world.json"

    @property
    def istiod_state(self) -> Path:
        return self.run_dir / "istiod"

    @property
    def admin_token(self) -> Path:
        return self.istiod_state / "admin.token"

    @property
    def root_cert(self) -> Path:
        return self.istiod_state / "root-cert.pem"

    def node_dir(self, node: str) -> Path:
        return self.run_dir / "nodes" / node

    def node_host(self, node: str) -> Path:
        """The node agent's view of "the host" (upstream's /host): run/netns/ holds links to this node's
        pods only, and there is no proc/, so its scan for a pod's netns by IP never strays into another
        node's or another lab's pods on this machine."""
        return self.node_dir(node) / "host"

    def pod_netns_link(self, node: str, netns: str) -> Path:
        return self.node_host(node) / "run" / "netns" / netns

    def zds_socket(self, node: str) -> Path:
        return self.node_dir(node) / "ztunnel.sock"

    def cni_socket(self, node: str) -> Path:
        return self.node_dir(node) / "pluginevent.sock"

    def log(self, name: str) -> Path:
        return self.logs / (name.replace("/", "_") + ".log")

    @property
    def kube(self) -> Path:
        """`lab up --kubernetes`: the API server's PKI, etcd's data, the kubeconfig, the kubelet's record."""
        return self.run_dir / "kube"

    @property
    def kubeconfig(self) -> Path:
        return self.kube / "kubeconfig"

    @property
    def kubelet_record(self) -> Path:
        """The pods the lab's kubelet ran or removed after `up` (kubelet.py)."""
        return self.kube / "kubelet.json"

    @property
    def cluster_dns(self) -> Path:
        return self.run_dir / "cluster-dns"

    @property
    def cluster_dns_hosts(self) -> Path:
        """dnsmasq's hostsdir: the world's names, re-read by dnsmasq whenever the lab rewrites them."""
        return self.cluster_dns / "hosts.d"

    @property
    def cluster_dns_queries(self) -> Path:
        """Every query the cluster DNS saw (dnsmasq's `log-queries`)."""
        return self.logs / "cluster-dns-queries.log"


def _python(module: str, *args: str) -> list[str]:
    return [PYTHON, "-m", module, *args]


def istiod_spec(
    plan: LabPlan, paths: LabPaths, node_tokens: dict[str, str], admin_token: str, *, kubernetes: bool = False
) -> ComponentSpec:
    """istiod-stub in the control-plane netns; tokens go in its environment (not argv: `ps` shows argv).
    With `kubernetes` it takes the world from the lab's API server (the world file gives its settings)."""
    cp = plan.control_plane
    args = ["--world", str(paths.world), "--listen", f"0.0.0.0:{ISTIOD_PORT}",
            "--state-dir", str(paths.istiod_state), "--tls-san", cp.ip]  # fmt: skip
    if kubernetes:
        args += ["--kubernetes", "--kubeconfig", str(paths.kubeconfig)]
    env = {
        "ISTIOD_ADMIN_TOKEN": admin_token,
        "ISTIOD_NODE_TOKENS": ",".join(f"{node}={token}" for node, token in sorted(node_tokens.items())),
    }
    return ComponentSpec(
        name="istiod",
        component="istiod",
        netns=cp.netns,
        argv=_python(MODULES["istiod"], *args),
        env=env,
        log=str(paths.log("istiod")),
        checks=[TcpCheck(netns=cp.netns, host=cp.ip, port=ISTIOD_PORT)],
    )


def cluster_dns_spec(plan: LabPlan, paths: LabPaths) -> ComponentSpec:
    """dnsmasq as the cluster DNS in the control-plane netns (its configuration is written here)."""
    conf = paths.cluster_dns / "dnsmasq.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    paths.logs.mkdir(parents=True, exist_ok=True)
    conf.write_text(dnsmasq_conf(hosts_dir=paths.cluster_dns_hosts, query_log=paths.cluster_dns_queries))
    cp = plan.control_plane
    return ComponentSpec(
        name="cluster-dns",
        component="cluster-dns",
        netns=cp.netns,
        argv=["dnsmasq", f"--conf-file={conf}"],
        log=str(paths.log("cluster-dns")),
        checks=[TcpCheck(netns=cp.netns, host=KUBE_DNS_VIP, port=53)],
    )


def node_agent_spec(
    plan: LabPlan,
    node: NodePlan,
    paths: LabPaths,
    *,
    istiod: str | None = None,
    netns: str | None = None,
    kubernetes: bool = False,
) -> ComponentSpec:
    """The node agent of `node`; `istiod` and `netns` override the lab's (containers: "istiod:15012", "").
    With `kubernetes` it takes its pods from the lab's API server (POD_SOURCE=kubernetes), as istio-cni."""
    cwd = paths.node_dir(node.name)
    netns = node.netns if netns is None else netns
    env = {
        "NODE_NAME": node.name,
        "ZTUNNEL_UDS_ADDRESS": str(paths.zds_socket(node.name)),  # the ZDS server socket ztunnel connects to
        "CNI_SOCKET": str(paths.cni_socket(node.name)),  # POST /cmdadd, GET /healthz
        "HEALTH_ADDR": f"127.0.0.1:{NODE_AGENT_HEALTH_PORT}",  # inside the node netns: /healthz, /verify
        "CONTROL_PLANE_ADDRESS": f"https://{istiod or plan.istiod_address}",  # the pod watch
        "CONTROL_PLANE_ROOT_CERT": str(cwd / ROOT_CERT_PATH),
        "CONTROL_PLANE_TOKEN_FILE": str(cwd / TOKEN_PATH),
    }
    if netns:  # many nodes share this machine: confine the agent's netns lookups to its own pods
        env["HOST_PREFIX"] = str(paths.node_host(node.name))
    if kubernetes:
        env.update(POD_SOURCE="kubernetes", KUBECONFIG=str(paths.kubeconfig))
    return ComponentSpec(
        name=f"node-agent/{node.name}",
        component="node-agent",
        netns=netns,
        argv=_python(MODULES["node-agent"]),
        env=env,
        cwd=str(cwd),
        log=str(paths.log(f"node-agent/{node.name}")),
        checks=[UnixHttpCheck(socket=str(paths.cni_socket(node.name)), path="/healthz")],
        node=node.name,
    )


def ztunnel_spec(
    plan: LabPlan,
    node: NodePlan,
    paths: LabPaths,
    *,
    with_agent: bool,
    istiod: str | None = None,
    netns: str | None = None,
    instance_ip: str | None = None,
    ztunnel_bin: str | None = None,
) -> ComponentSpec:
    """ztunnel of `node`; the overrides are for a node that is a container (see node_agent_spec).
    With `ztunnel_bin`, that binary (a build of istio/ztunnel) with upstream's settings instead of ours."""
    cwd = paths.node_dir(node.name)
    netns = node.netns if netns is None else netns
    istiod = istiod or plan.istiod_address
    if ztunnel_bin is not None:
        env = upstream.upstream_env(plan, node, zds_socket=str(paths.zds_socket(node.name)),
                                    root_cert=str(cwd / ROOT_CERT_PATH), token=str(cwd / TOKEN_PATH),
                                    istiod=istiod)  # fmt: skip
        if instance_ip:
            env["INSTANCE_IP"] = instance_ip
        argv, implementation = [ztunnel_bin], upstream.IMPLEMENTATION_UPSTREAM
    else:
        env = {
            "NODE_NAME": node.name,
            "POD_NAME": f"ztunnel-{node.name}",
            "POD_NAMESPACE": "istio-system",
            "INSTANCE_IP": instance_ip or node.ip,
            "INPOD_UDS": str(paths.zds_socket(node.name)),
            **control_plane_env(istiod, cwd),
            "CLUSTER_ID": "Kubernetes",
            "LOG_FORMAT": "plain",
        }
        if netns:  # the node's resolv.conf names the cluster DNS: forwarded queries never leave the lab
            env["DNS_RESOLV_CONF"] = str(ETC_NETNS / netns / "resolv.conf")
        argv, implementation = _python(MODULES["ztunnel"]), upstream.IMPLEMENTATION_OURS
    # Both implementations: the same name, node and readiness check, so `lab status`, `lab restart` and
    # `ambient logs` treat them alike.
    return ComponentSpec(
        name=f"ztunnel/{node.name}",
        component="ztunnel",
        implementation=implementation,
        netns=netns,
        argv=argv,
        env=env,
        cwd=str(cwd),
        log=str(paths.log(f"ztunnel/{node.name}")),
        checks=[
            HttpCheck(
                netns=netns,
                host="127.0.0.1",
                port=ZTUNNEL_READY_PORT,
                path="/healthz/ready",
                status=200 if with_agent else 0,
            )
        ],
        node=node.name,
    )


def app_spec(pod: PodPlan, paths: LabPaths) -> ComponentSpec:
    args = [pod.app.kind, *(a for port in pod.app.ports for a in ("--port", str(port)))]
    name = f"app/{pod.namespace}/{pod.name}"
    return ComponentSpec(
        name=name,
        component="app",
        netns=pod.netns,
        argv=_python(MODULES["app"], *args),
        env=dict(pod.app.env, POD_IP=pod.ip),
        log=str(paths.log(name)),
        checks=[TcpCheck(netns=pod.netns, host="127.0.0.1", port=p) for p in pod.app.ports],
        node=pod.node,
        pod=f"{pod.namespace}/{pod.name}",
    )


def control_plane_env(istiod: str, node_dir: Path) -> dict[str, str]:
    """How a node's proxies reach istiod: its address for xDS and the CA, the node's token and root cert."""
    return {
        "XDS_ADDRESS": f"https://{istiod}",
        "CA_ADDRESS": f"https://{istiod}",
        "XDS_ROOT_CERT": str(node_dir / ROOT_CERT_PATH),
        "XDS_TOKEN_FILE": str(node_dir / TOKEN_PATH),
        "CA_ROOT_CERT": str(node_dir / ROOT_CERT_PATH),
        "CA_TOKEN_FILE": str(node_dir / TOKEN_PATH),
    }


def waypoint_spec(
    plan: LabPlan, pod: PodPlan, paths: LabPaths, *, istiod: str | None = None
) -> ComponentSpec:
    """The waypoint process of a waypoint's pod, in the pod's netns (the pod is not captured). Like a
    workload's proxy it proves its node with the node's token and gets the pod identity's certificate from
    the CA; its xDS node id is the pod's (`router~IP~POD.NS~...`), which alone receives its WaypointConfig.
    Ready once it accepts on 15008 and its /healthz/ready on 15021 says it is synced with xDS."""
    name = f"waypoint/{pod.namespace}/{pod.name}"
    cwd = paths.node_dir(pod.node)
    return ComponentSpec(
        name=name,
        component="waypoint",
        netns=pod.netns,
        argv=_python(MODULES["waypoint"]),
        env={
            **pod.app.env,
            "NODE_NAME": pod.node,
            "INSTANCE_IP": pod.ip,
            **control_plane_env(istiod or plan.istiod_address, cwd),
            "LOG_FORMAT": "plain",
        },
        cwd=str(cwd),
        log=str(paths.log(name)),
        checks=[
            *(TcpCheck(netns=pod.netns, host=pod.ip, port=p) for p in pod.app.ports),
            # ready once synced with xDS (its certificate and its WaypointConfig), as ztunnel's 15021
            HttpCheck(netns=pod.netns, host="127.0.0.1", port=ZTUNNEL_READY_PORT, path="/healthz/ready",
                      status=200),
        ],
        node=pod.node,
        pod=f"{pod.namespace}/{pod.name}",
    )


def pod_spec(
    plan: LabPlan, pod: PodPlan, paths: LabPaths, *, istiod: str | None = None
) -> ComponentSpec | None:
    """What runs in `pod`: its app, or for a waypoint's pod the waypoint process (None while that program is
    not installed: traffic sent to the waypoint then fails closed)."""
    if pod.app.kind != WAYPOINT_PROGRAM:
        return app_spec(pod, paths)
    if not available("waypoint"):
        return None
    return waypoint_spec(plan, pod, paths, istiod=istiod)


def write_node_secrets(paths: LabPaths, node: str, token: str) -> None:
    """Give a node's processes their token and (once istiod wrote it) the root certificate."""
    base = paths.node_dir(node)
    token_file = base / TOKEN_PATH
    token_file.parent.mkdir(parents=True, exist_ok=True)
    write_secret(token_file, token.encode())  # no newline, as the kubelet writes it: upstream sends it as is
    if paths.root_cert.exists():
        cert = base / ROOT_CERT_PATH
        cert.parent.mkdir(parents=True, exist_ok=True)
        cert.write_bytes(paths.root_cert.read_bytes())


# --- running ---------------------------------------------------------------------------------------------


def process_env(spec: ComponentSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.update(spec.env)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = os.pathsep.join([str(Path(PYTHON).parent), env.get("PATH", ""), "/usr/sbin", "/sbin"])
    return env


def link_pod_netns(paths: LabPaths, node: str, netns: str) -> None:
    """Show pod `netns` to its node's agent: <node host>/run/netns/<netns> -> /run/netns/<netns>."""
    link = paths.pod_netns_link(node, netns)
    link.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(f"/run/netns/{netns}")


def tool_env() -> dict[str, str]:
    """The environment for a one-off command in the lab (`lab exec`, `lab world`): this project importable."""
    return process_env(ComponentSpec(name="tool", component="tool", netns="", argv=[], log=""))


def start(spec: ComponentSpec) -> ProcessRecord:
    """Start `spec` inside its namespace (its own when `spec.netns` is empty), detached (own session),
    output appended to its log file."""
    Path(spec.log).parent.mkdir(parents=True, exist_ok=True)
    if spec.cwd:
        Path(spec.cwd).mkdir(parents=True, exist_ok=True)
    with open(spec.log, "ab") as log:
        log.write(f"--- lab: starting {spec.name}: {' '.join(spec.argv)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", spec.netns, *spec.argv] if spec.netns else spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=process_env(spec),
                cwd=spec.cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise ComponentError(f"cannot start {spec.name}: {exc}") from None
    start_time = process_start_time(proc.pid)
    if start_time is None:  # already gone: let wait_ready report it with the log
        start_time = -1
    return ProcessRecord(spec=spec, pid=proc.pid, start_time=start_time)


def log_tail(path: str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def check_once(check: Check) -> str | None:
    """None when `check` passes, else why not (for the timeout message)."""
    try:
        if isinstance(check, TcpCheck):
            tcp_probe(check.netns, check.host, check.port)
            return None
        if isinstance(check, HttpCheck):
            status, body = http_get(check.netns, check.host, check.port, check.path)
            if check.status and status != check.status:
                return f"{check.path} answered {status}: {body.decode(errors='replace').strip()[:200]}"
            return None
        status, body = unix_http(check.socket, "GET", check.path, timeout=2.0)
        if status != 200:
            return f"{check.socket} {check.path} answered {status}"
        return None
    except (OSError, NetnsError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"


def wait_ready(
    record: ProcessRecord,
    *,
    timeout: float,
    is_alive: Callable[[ProcessRecord], bool] = is_running,
    poll: float = 0.1,
) -> None:
    """Wait until every check of the process passes.

    Raises:
        ComponentError: the process exited, or was not ready within `timeout` s; names its log file.
    """
    spec = record.spec
    deadline = time.monotonic() + timeout
    why = "no check ran"
    while True:
        if not is_alive(record):
            raise ComponentError(
                f"{spec.name} exited during start-up; see its log {spec.log}:\n{log_tail(spec.log)}"
            )
        failing = [r for r in (check_once(c) for c in spec.checks) if r is not None]
        if not failing:
            return
        why = failing[0]
        if time.monotonic() >= deadline:
            raise ComponentError(
                f"{spec.name} was not ready after {timeout:g} s ({why}); see its log {spec.log}:\n"
                f"{log_tail(spec.log)}"
            )
        time.sleep(poll)
