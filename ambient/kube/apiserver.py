"""A real Kubernetes API server on loopback: etcd and kube-apiserver in a temporary directory.

Usage (Trio)::

    async with open_api_server() as api:        # BinariesMissing when scripts/build-kube has not run
        api.kubeconfig                          # a kubeconfig for kubectl and the Python client (admin)
        await api.kubectl("get", "namespaces")
        await api.restart()                     # kube-apiserver only; etcd (the data) stays
        await api.compact_etcd()                # forget history: watches from older versions get 410

Theory of operation
-------------------
Everything lives in one temporary directory: a CA, the API server's serving certificate (SANs 127.0.0.1,
localhost and the `kubernetes` service's names), an admin client certificate (organisation
`system:masters`, which the API server's RBAC lets do anything), the service-account signing key pair,
etcd's data and both processes' logs. etcd listens on plain HTTP on 127.0.0.1 (only the API server talks to
it); kube-apiserver serves TLS on 127.0.0.1 with client-certificate authentication and RBAC. Both ports are
free ones picked at start; a restart keeps the API server's port, so clients (and their watches) come
back to the same address.

Admission plugin `ServiceAccount` is off: no controller manager runs to create each namespace's `default`
service account, so with it on every pod would be refused. Privileged containers are allowed (the node
agent's and ztunnel's DaemonSets need them). `watch_cache=False` makes watches read etcd directly, so a
watch resumes from any version etcd still holds (with the cache on, only from versions the cache holds).

The processes are started in their own sessions and stopped by their PIDs (SIGTERM, then SIGKILL after
10 s); the directory is removed afterwards. The binaries come from `KUBE_BIN_DIR` or from the cache
directory `scripts/build-kube` builds into.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ambient.kube.errors import BinariesMissing, KubeError
from shared.identity import cert_to_pem, generate_key, key_to_pem
from shared.secretfile import write_secret

log = logging.getLogger("ambient.kube")

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-kube"
BINARIES = ("etcd", "kube-apiserver", "kubectl")
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # the `kubernetes` service's cluster IP: first address of SERVICE_CIDR
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
READY_TIMEOUT = 90.0
STOP_GRACE = 10.0


def binaries_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where etcd, kube-apiserver and kubectl are: $KUBE_BIN_DIR, else scripts/build-kube's cache.

    Raises:
        BinariesMissing: one of them is not there (the message says how to build them).
    """
    env = os.environ if env is None else env
    given = env.get("KUBE_BIN_DIR")
    if given:
        where = Path(given)
    else:
        try:
            out = subprocess.run(
                [str(BUILD_SCRIPT), "--print-path"], capture_output=True, text=True, check=True, timeout=10
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise BinariesMissing(f"cannot ask {BUILD_SCRIPT} where the binaries are: {exc}") from None
        where = Path(out.strip())
    missing = [b for b in BINARIES if not os.access(where / b, os.X_OK)]
    if missing:
        how = "set KUBE_BIN_DIR to where they are" if given else f"build them with {BUILD_SCRIPT}"
        raise BinariesMissing(f"{', '.join(missing)} not found in {where}: {how} (needs Go, ~15 min cold)")
    return where


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Pki:
    """The certificates and keys of one API server, as files in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = root / "ca.crt"
        self.serving_cert, self.serving_key = root / "apiserver.crt", root / "apiserver.key"
        self.admin_cert, self.admin_key = root / "admin.crt", root / "admin.key"
        self.sa_key, self.sa_pub = root / "sa.key", root / "sa.pub"

    def generate(self, extra_ips: Sequence[str] = ()) -> None:
        """Write every file; `extra_ips` are more addresses the API server is reached at (the lab's
        control-plane address) for its serving certificate."""
        self.root.mkdir(parents=True, exist_ok=True)
        ca_key = generate_key()
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trio-ambient kube CA")])
        ca = _cert(ca_name, ca_name, ca_key.public_key(), ca_key, is_ca=True)
        write_secret(self.ca, cert_to_pem(ca).encode())
        serving_key = generate_key()
        sans: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address(SERVICE_IP)),
            *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in extra_ips),
            x509.DNSName("localhost"),
            *(x509.DNSName(n) for n in ("kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                        "kubernetes.default.svc.cluster.local")),
        ]
        serving = _cert(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]), ca_name,
            serving_key.public_key(), ca_key, sans=sans, usage=ExtendedKeyUsageOID.SERVER_AUTH,
        )
        write_secret(self.serving_cert, cert_to_pem(serving).encode())
        write_secret(self.serving_key, key_to_pem(serving_key))
        admin_key = generate_key()
        admin = _cert(
            x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                       x509.NameAttribute(NameOID.COMMON_NAME, "admin")]), ca_name,
            admin_key.public_key(), ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        write_secret(self.admin_cert, cert_to_pem(admin).encode())
        write_secret(self.admin_key, key_to_pem(admin_key))
        sa_key = generate_key()
        write_secret(self.sa_key, key_to_pem(sa_key))
        write_secret(self.sa_pub, sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.admin_cert), str(self.admin_key))
        return ctx


def _cert(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    *,
    is_ca: bool = False,
    sans: Sequence[x509.GeneralName] = (),
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=not is_ca,
                data_encipherment=False, key_agreement=False, key_cert_sign=is_ca, crl_sign=is_ca,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def kubeconfig_document(server: str, pki: Pki, *, user: str = "admin") -> dict[str, Any]:
    """A kubeconfig with the CA and the admin's client certificate embedded (so it can be copied)."""

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "local", "cluster": {"server": server, "certificate-authority-data": b64(pki.ca)}}
        ],
        "users": [{"name": user, "user": {
            "client-certificate-data": b64(pki.admin_cert), "client-key-data": b64(pki.admin_key)}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
    }


def etcd_argv(bin_dir: Path, data_dir: Path, port: int, peer_port: int) -> list[str]:
    """etcd on 127.0.0.1:`port` (plain HTTP: only the API server beside it talks to it), one member."""
    client, peer = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
    return [
        str(bin_dir / "etcd"),
        "--name", "default",
        "--data-dir", str(data_dir),
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"default={peer}",
        "--unsafe-no-fsync", "--log-level", "warn",
    ]  # fmt: skip


def apiserver_argv(
    bin_dir: Path,
    pki: Pki,
    root: Path,
    *,
    etcd_url: str,
    bind: str,
    port: int,
    advertise: str = "127.0.0.1",
    watch_cache: bool = True,
) -> list[str]:
    """kube-apiserver serving TLS on `bind`:`port` with client certificates and RBAC (module docstring)."""
    return [
        str(bin_dir / "kube-apiserver"),
        "--etcd-servers", etcd_url,
        "--bind-address", bind, "--advertise-address", advertise,
        "--secure-port", str(port),
        "--tls-cert-file", str(pki.serving_cert), "--tls-private-key-file", str(pki.serving_key),
        "--client-ca-file", str(pki.ca),
        "--service-account-issuer", SA_ISSUER,
        "--service-account-key-file", str(pki.sa_pub),
        "--service-account-signing-key-file", str(pki.sa_key),
        "--service-cluster-ip-range", SERVICE_CIDR,
        "--authorization-mode", "RBAC",
        "--endpoint-reconciler-type", "none",  # no kubelet runs the API server: no kubernetes endpoints
        "--disable-admission-plugins", "ServiceAccount",
        "--allow-privileged=true",
        "--enable-priority-and-fairness=false",
        "--profiling=false",
        "--cert-dir", str(root / "apiserver-certs"),
        f"--watch-cache={'true' if watch_cache else 'false'}",
    ]  # fmt: skip


class ApiServer:
    """A running etcd + kube-apiserver pair (see the module docstring); made by `open_api_server`."""

    def __init__(self, root: Path, bin_dir: Path, *, watch_cache: bool = True) -> None:
        self.root = root
        self.bin_dir = bin_dir
        self.watch_cache = watch_cache
        self.pki = Pki(root / "pki")
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.port = free_port()
        self.kubeconfig = root / "kubeconfig"
        self._etcd: trio.Process | None = None
        self._apiserver: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    def log_path(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    async def start(self) -> None:
        """Generate the PKI and kubeconfig, start etcd, then the API server; return once both are ready."""
        self.pki.generate()
        (self.root / "logs").mkdir(exist_ok=True)
        self.kubeconfig.write_text(yaml.safe_dump(kubeconfig_document(self.url, self.pki)))
        self.kubeconfig.chmod(0o600)
        self._etcd = await self._spawn(
            "etcd", etcd_argv(self.bin_dir, self.root / "etcd", self.etcd_port, self.etcd_peer_port))
        await self._wait_ready("etcd", self._etcd, self._etcd_healthy)
        await self.start_apiserver()

    async def start_apiserver(self) -> None:
        if self._apiserver is not None:
            raise KubeError("kube-apiserver is already running")
        argv = apiserver_argv(self.bin_dir, self.pki, self.root, etcd_url=self.etcd_url, bind="127.0.0.1",
                              port=self.port, watch_cache=self.watch_cache)
        self._apiserver = await self._spawn("kube-apiserver", argv)
        await self._wait_ready("kube-apiserver", self._apiserver, self._apiserver_ready)
        log.info("kube-apiserver ready", extra={"fields": [("url", self.url)]})

    async def stop_apiserver(self) -> None:
        proc, self._apiserver = self._apiserver, None
        if proc is not None:
            await _stop(proc)

    async def restart(self) -> None:
        """Stop and start kube-apiserver on the same port; etcd (the objects) stays."""
        await self.stop_apiserver()
        await self.start_apiserver()

    async def stop(self) -> None:
        await self.stop_apiserver()
        proc, self._etcd = self._etcd, None
        if proc is not None:
            await _stop(proc)

    async def kubectl(self, *args: str, input: bytes | None = None, check: bool = True) -> str:
        """Run kubectl with this server's kubeconfig; its stdout. Raises KubeError (with stderr) on failure
        when `check`."""
        argv = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        result = await trio.run_process(argv, stdin=input, capture_stdout=True, capture_stderr=True,
                                        check=False)
        if check and result.returncode != 0:
            raise KubeError(f"kubectl {' '.join(args)}: {result.stderr.decode().strip()}")
        return result.stdout.decode()

    async def etcd(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """One call of etcd's JSON gateway (`/v3/kv/range`, `/v3/kv/deleterange`, `/v3/kv/compaction`)."""
        return await trio.to_thread.run_sync(self._etcd_call, path, dict(body))

    async def compact_etcd(self) -> int:
        """Compact etcd's history up to its current revision (returned): every older resource version is
        gone, so a watch from one of them is answered 410 Gone."""
        head = await self.etcd("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})
        revision = int(head["header"]["revision"])
        await self.etcd("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    async def delete_from_etcd(self, key: str) -> None:
        """Delete an object behind the API server's back (e.g. `/registry/pods/NS/NAME`), as if the change
        happened while a client was not watching."""
        await self.etcd("/v3/kv/deleterange", {"key": base64.b64encode(key.encode()).decode()})

    def _etcd_call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.etcd_port, timeout=10)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise KubeError(f"etcd {path}: HTTP {response.status}: {data[:200]!r}")
        result: dict[str, Any] = json.loads(data)
        return result

    def _etcd_healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.etcd_port, timeout=2)
        try:
            conn.request("GET", "/health")
            return b'"true"' in conn.getresponse().read()
        finally:
            conn.close()

    def _apiserver_ready(self) -> bool:
        context = self.pki.client_context()
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=5, context=context)
        try:
            conn.request("GET", "/readyz")
            response = conn.getresponse()
            response.read()
            return response.status == 200
        finally:
            conn.close()

    async def _spawn(self, name: str, argv: list[str]) -> trio.Process:
        with self.log_path(name).open("ab") as logfile:
            proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.debug("started", extra={"fields": [("component", name), ("pid", proc.pid)]})
        return proc

    async def _wait_ready(self, name: str, proc: trio.Process, probe: Any) -> None:
        with trio.move_on_after(READY_TIMEOUT):
            while True:
                if proc.returncode is not None or proc.poll() is not None:
                    raise KubeError(f"{name} exited with {proc.returncode} at start: {self._tail(name)}")
                try:
                    if await trio.to_thread.run_sync(probe):
                        return
                except (OSError, http.client.HTTPException):
                    pass
                await trio.sleep(0.2)
        raise KubeError(f"{name} not ready after {READY_TIMEOUT:.0f} s: {self._tail(name)}")

    def _tail(self, name: str) -> str:
        try:
            lines = self.log_path(name).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-5:]) or "(empty log)"


async def _stop(proc: trio.Process) -> None:
    """SIGTERM by PID, SIGKILL after STOP_GRACE seconds; reaps the process."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        with trio.CancelScope(shield=True), trio.move_on_after(STOP_GRACE) as scope:
            await proc.wait()
        if scope.cancelled_caught:
            proc.kill()
    with trio.CancelScope(shield=True):
        await proc.wait()


@asynccontextmanager
async def open_api_server(
    *, bin_dir: Path | None = None, watch_cache: bool = True, keep: bool = False
) -> AsyncIterator[ApiServer]:
    """Start etcd and kube-apiserver in a new temporary directory; stop them and remove it on exit.

    Raises:
        BinariesMissing: the binaries are not built.
        KubeError: a process did not start or get ready (the message quotes its log).
    """
    where = bin_dir or binaries_dir()
    root = Path(tempfile.mkdtemp(prefix="ambient-kube-"))
    server = ApiServer(root, where, watch_cache=watch_cache)
    try:
        await server.start()
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await server.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
