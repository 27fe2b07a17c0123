"""`istiod-stub`: the control plane process for the local stack.

    istiod-stub --world examples/bookinfo.yaml [--listen 127.0.0.1:15012] [--state-dir DIR] [--plaintext]
                [--node-token NODE=TOKEN ...] [--admin-token TOKEN] [--tls-san NAME ...]
                [--root-cert FILE --root-key FILE] [--tls-cert FILE --tls-key FILE]
    istiod-stub --kubernetes [--kubeconfig PATH] [--world SETTINGS-FILE] ...

With --kubernetes the world's namespaces, nodes, pods, services and AuthorizationPolicies come from the
Kubernetes API server (--kubeconfig, else the in-cluster service account, $KUBECONFIG or ~/.kube/config) and
follow its changes (kube_source.py); a --world file then gives only the mesh settings (trust domain, ...),
and the world admin API (`ambient world`) only reads.

Everything a client needs is written to the state directory (default ./.istiod-state, env ISTIOD_STATE_DIR):
  root-cert.pem          the root CA certificate clients verify the server and workload certificates with
  root-key.pem           the root key (0600; reused across restarts so issued certificates stay valid)
  tokens/<node>.token    per-node bearer tokens (generated unless --node-token / ISTIOD_NODE_TOKENS)
  admin.token            the token `ambient world ...` presents (else --admin-token / ISTIOD_ADMIN_TOKEN)

Signals: SIGINT/SIGTERM stop the stub; SIGHUP re-reads the --world file (a bad file is logged and ignored;
nothing to re-read with --kubernetes).
Change the world at runtime with `ambient world ...` (see ambient/world.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import ssl
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from services.istiod.auth import Auth
from services.istiod.ca import CertificateAuthority
from services.istiod.errors import StartupError
from services.istiod.kube_source import KubeWorldSource
from services.istiod.kube_world import mesh_settings
from services.istiod.server import DEFAULT_SERVER_NAMES, IstiodServer, server_ssl_context
from services.istiod.store import WorldStore
from services.istiod.world import MAX_WORLD_BYTES, World, load_world
from shared.addr import AddressError, format_host_port, split_host_port
from shared.errors import AmbientError
from shared.identity import IdentityError, load_cert, load_key
from shared.kube.client import load_config as load_kube_config
from shared.limits import raise_open_files_limit
from shared.logs import LOG_FORMATS, Display, log_format_from, setup_logging
from shared.secretfile import write_secret
from shared.settings import check_listen
from shared.version import version_text

log = logging.getLogger("istiod-stub")

DEFAULT_LISTEN = "127.0.0.1:15012"


ENV_HELP = f"""settings (environment variables; a flag wins over its variable):
  ISTIOD_LISTEN              HOST:PORT to serve on (default {DEFAULT_LISTEN}); checked at start
  ISTIOD_STATE_DIR           root CA, tokens (default ./.istiod-state)
  ISTIOD_NODE_TOKENS         NODE=TOKEN,NODE=TOKEN: given node tokens (others are generated)
  ISTIOD_ADMIN_TOKEN         the admin token (default: generated, in STATE_DIR/admin.token)
  KUBECONFIG                 with --kubernetes and no --kubeconfig, when not in a cluster: the kubeconfig
  LOG_LEVEL                  debug, info, warning or error (default info)"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="istiod-stub",
        description="Control plane stub: delta xDS, CA, pod watch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=ENV_HELP,
    )
    p.add_argument("--version", action="version", version=version_text("istiod-stub"))
    p.add_argument("--world", type=Path, help="world file (YAML/JSON); default: an empty world")
    p.add_argument("--kubernetes", action="store_true",
                   help="take the world from the Kubernetes API server, and follow it")
    p.add_argument("--kubeconfig", help="with --kubernetes: the kubeconfig file (default: in-cluster, then "
                   "$KUBECONFIG, then ~/.kube/config)")
    p.add_argument(
        "--listen", default=os.environ.get("ISTIOD_LISTEN", DEFAULT_LISTEN), help="HOST:PORT (ISTIOD_LISTEN)"
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("ISTIOD_STATE_DIR", ".istiod-state")),
        help="root CA, tokens (ISTIOD_STATE_DIR)",
    )
    p.add_argument("--plaintext", action="store_true", help="serve without TLS (tests and debugging only)")
    p.add_argument(
        "--node-token", action="append", default=[], metavar="NODE=TOKEN", help="(ISTIOD_NODE_TOKENS=a=x,b=y)"
    )
    p.add_argument("--admin-token", default=os.environ.get("ISTIOD_ADMIN_TOKEN"), help="(ISTIOD_ADMIN_TOKEN)")
    p.add_argument(
        "--tls-san",
        action="append",
        default=[],
        metavar="NAME",
        help="extra DNS name/IP for the serving cert",
    )
    p.add_argument(
        "--root-cert", type=Path, help="use this CA certificate (with --root-key) instead of the state dir's"
    )
    p.add_argument("--root-key", type=Path, help="the CA's private key (PEM, ECDSA)")
    p.add_argument("--tls-cert", type=Path, help="serve with this certificate chain (with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="the serving certificate's key")
    p.add_argument(
        "--log-level",
        default=os.environ.get("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        type=str.lower,
        help="(LOG_LEVEL; default info)",
    )
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="plain: upstream's tab-separated lines with k=v fields (default); json: one object a line "
        "(LOG_FORMAT)",
    )
    args = p.parse_args(argv)
    if args.kubeconfig and not args.kubernetes:
        p.error("--kubeconfig is for --kubernetes: add --kubernetes, or leave --kubeconfig out")
    if args.log_format is None:
        try:
            args.log_format = log_format_from(os.environ)
        except ValueError as exc:
            p.error(str(exc))
    return args


def _listen_setting(argv: Sequence[str] | None) -> str:
    """How the operator gave the listen address: the flag when on the command line, else the variable."""
    given = sys.argv[1:] if argv is None else argv
    return "--listen" if any(a.startswith("--listen") for a in given) else "ISTIOD_LISTEN"


def _split_listen(text: str, setting: str = "--listen") -> tuple[str, int]:
    try:
        return split_host_port(text, default_host="0.0.0.0")
    except AddressError as exc:
        raise StartupError(f"{setting}={text!r} {exc.problem}") from None


def check_listen_address(args: argparse.Namespace, argv: Sequence[str] | None = None) -> None:
    """Refuse, before anything starts, a listen address that is malformed or cannot be bound.

    Raises:
        StartupError: naming the setting, its value and what to do.
    """
    setting = _listen_setting(argv)
    host, port = _split_listen(args.listen, setting)
    if port:
        check_listen(setting, host, port, error=StartupError)


class NodeTokens:
    """Per-node bearer tokens: given ones (--node-token / ISTIOD_NODE_TOKENS) win; other nodes get a random
    token, kept in state_dir/tokens/<node>.token across restarts. Nodes added later by `ambient world` get
    theirs when they appear."""

    def __init__(self, given: dict[str, str], token_dir: Path) -> None:
        self.given = given
        self.token_dir = token_dir
        self.tokens: dict[str, str] = dict(given)

    @classmethod
    def from_args(cls, args: argparse.Namespace, state_dir: Path) -> NodeTokens:
        given: dict[str, str] = {}
        pairs = [*args.node_token, *filter(None, os.environ.get("ISTIOD_NODE_TOKENS", "").split(","))]
        for pair in pairs:
            node, sep, token = pair.partition("=")
            if not sep or not node.strip() or not token.strip():
                raise StartupError(f"node token {pair!r} is not NODE=TOKEN")
            given[node.strip()] = token.strip()
        return cls(given, state_dir / "tokens")

    def ensure(self, world: World) -> dict[str, str]:
        """Tokens for every node of `world` (files written for new ones). Raises OSError."""
        self.token_dir.mkdir(parents=True, exist_ok=True)
        for node in world.nodes:
            path = self.token_dir / f"{node.name}.token"
            if node.name not in self.tokens:
                self.tokens[node.name] = (
                    path.read_text().strip() if path.exists() else secrets.token_urlsafe(24)
                )
                _write_secret(path, self.tokens[node.name])
            elif node.name in self.given and not path.exists():
                _write_secret(path, self.tokens[node.name])
        return self.tokens


async def keep_tokens(store: WorldStore, auth: Auth, tokens: NodeTokens) -> None:
    """Give nodes that appear in the world (through the admin API) a token."""
    with store.subscribe() as wakeup:
        while True:
            await wakeup.wait()
            try:
                auth.set_node_tokens(tokens.ensure(store.world))
            except OSError as exc:
                log.error("cannot write node tokens",
                          extra={"fields": [("path", str(tokens.token_dir)), ("error", str(exc))]})


def _load_world_file(path: Path) -> World:
    try:
        size = path.stat().st_size
        if size > MAX_WORLD_BYTES:  # refused before reading, so a huge file costs no memory
            raise StartupError(f"the world file {path} is {size:,} bytes, over the limit of "
                               f"{MAX_WORLD_BYTES:,}")
        data = path.read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the world file {path}: {exc.strerror}") from None
    return load_world(data, str(path))


async def handle_signals(
    path: Path | None, store: WorldStore, cancel: trio.CancelScope, *, kubernetes: bool = False
) -> None:
    """SIGINT/SIGTERM stop the stub; SIGHUP re-reads the world file (a bad file is logged and ignored)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                if kubernetes:
                    log.warning("SIGHUP: the world follows the Kubernetes API; nothing to reload")
                    continue
                if path is None:
                    log.warning("SIGHUP: no --world file to reload")
                    continue
                try:
                    store.apply(_load_world_file(path), str(path))
                except AmbientError as exc:
                    log.error("SIGHUP: keeping the current world", extra={"fields": [("error", str(exc))]})
                continue
            log.info("received signal, shutting down",
                     extra={"fields": [("signal", signal.Signals(signum).name)]})
            cancel.cancel()
            return


def _write_secret(path: Path, value: str) -> None:
    write_secret(path, (value + "\n").encode())


def _load_ca(args: argparse.Namespace, state_dir: Path, world: World) -> tuple[CertificateAuthority, Path]:
    """The CA and the file its root certificate is in (what clients must trust).

    Raises:
        StartupError: --root-cert without --root-key (or the other way), unreadable files, or a key that is
            not the certificate's.
    """
    if bool(args.root_cert) != bool(args.root_key):
        raise StartupError("--root-cert and --root-key go together")
    state_root = state_dir / "root-cert.pem"
    if args.root_cert is None:
        return CertificateAuthority.load_or_create(state_dir, world.trust_domain), state_root
    try:
        key, cert = load_key(args.root_key.read_bytes()), load_cert(args.root_cert.read_bytes())
    except (OSError, IdentityError) as exc:
        raise StartupError(f"cannot use --root-cert/--root-key: {exc}") from None
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise StartupError(f"--root-key {args.root_key} is not the key of --root-cert {args.root_cert}; "
                           "give the certificate's own key")
    ca = CertificateAuthority(key, cert)
    # Clients read the root from the state dir: put it there when the state dir has none of its own. A state
    # dir's root (with its root-key.pem) is never overwritten: clients are then told the given file.
    if state_root.exists() or (state_dir / "root-key.pem").exists():
        return ca, state_root if _same_text(state_root, ca.root_pem) else args.root_cert
    state_dir.mkdir(parents=True, exist_ok=True)
    state_root.write_text(ca.root_pem)
    return ca, state_root


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return public_key.public_bytes(der, spki)


def _same_text(path: Path, text: str) -> bool:
    try:
        return path.read_text() == text
    except OSError:
        return False


def _given_ssl_context(args: argparse.Namespace) -> ssl.SSLContext:
    if not (args.tls_cert and args.tls_key):
        raise StartupError("--tls-cert and --tls-key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    try:
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot use --tls-cert/--tls-key: {exc}") from None
    return ctx


async def run(args: argparse.Namespace) -> None:
    host, port = _split_listen(args.listen)
    state_dir: Path = args.state_dir
    world = _load_world_file(args.world) if args.world is not None else World()
    if args.kubernetes:  # the file's settings only: the objects come from the API server
        world = mesh_settings(world)
        load_kube_config(args.kubeconfig)  # a bad configuration fails here, in one line
    tokens = NodeTokens.from_args(args, state_dir)
    try:
        ca, root_path = _load_ca(args, state_dir, world)
        node_tokens = tokens.ensure(world)
        admin_token = args.admin_token
        admin_path = state_dir / "admin.token"
        if admin_token is None:
            admin_token = admin_path.read_text().strip() if admin_path.exists() else secrets.token_urlsafe(24)
        _write_secret(admin_path, admin_token)
    except OSError as exc:
        raise StartupError(f"cannot write to the state directory {state_dir}: {exc}") from None
    ssl_context = None
    if not args.plaintext:
        if args.tls_cert or args.tls_key:
            ssl_context = _given_ssl_context(args)
        else:
            ssl_context = server_ssl_context(
                ca, [*DEFAULT_SERVER_NAMES, *args.tls_san, *([host] if host not in ("0.0.0.0", "::") else [])]
            )
    store = WorldStore(world)
    auth = Auth(node_tokens, admin_token)
    server = IstiodServer(store, ca, auth)
    async with trio.open_nursery() as nursery:
        if args.kubernetes:
            log.info("waiting for the first listing from the Kubernetes API before serving",
                     extra={"fields": [("kubeconfig", args.kubeconfig or "in-cluster or $KUBECONFIG")]})
            await nursery.start(KubeWorldSource(store, base=world, kubeconfig=args.kubeconfig).run)
            try:
                auth.set_node_tokens(tokens.ensure(store.world))
            except OSError as exc:
                raise StartupError(f"cannot write node tokens to {tokens.token_dir}: {exc}") from None
            world = store.world
        try:
            bound = await nursery.start(
                lambda task_status: server.serve(
                    host=host, port=port, ssl_context=ssl_context, task_status=task_status
                )
            )
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        log.info("istiod-stub serving", extra={"fields": [
            ("address", Display(format_host_port(host, bound))),
            ("transport", Display("plaintext" if args.plaintext else "tls")), ("pods", len(world.pods)),
            ("services", len(world.services)), ("policies", len(world.policies)),
            ("root_cert", str(root_path))]})
        nursery.start_soon(keep_tokens, store, auth, tokens)
        nursery.start_soon(
            partial(handle_signals, args.world, store, nursery.cancel_scope, kubernetes=args.kubernetes))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        check_listen_address(args, argv)
    except StartupError as problem:
        print(f"istiod-stub: error: {problem}", file=sys.stderr)
        sys.exit(2)
    setup_logging(json_format=args.log_format == "json", level=str(args.log_level))
    raise_open_files_limit("istiod-stub")
    try:
        trio.run(run, args)
    except* AmbientError as group:
        for exc in group.exceptions:
            print(f"istiod-stub: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except* KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
