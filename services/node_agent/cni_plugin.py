"""`ambient-cni`: a chained CNI 1.0 plugin that forwards ADD to the node agent's CNI-event socket.

The container runtime runs it after the primary plugin with CNI_COMMAND, CNI_NETNS, CNI_ARGS
(K8S_POD_NAME, K8S_POD_NAMESPACE, K8S_POD_UID) in the environment and the network configuration, including
`prevResult`, on stdin. On ADD it posts the pod to the agent and, when the agent answers 2xx, prints the
`prevResult` unchanged (a chained plugin passes it on). Any failure is printed as a CNI error
({"cniVersion", "code", "msg", "details"}) with exit status 1, so the pod sandbox is not created and the
runtime retries: a pod never starts unredirected. DEL, CHECK, GC and STATUS succeed without doing anything
(removal follows the pod watch); VERSION prints the supported versions.

Config keys of our own (all optional): `cni_event_address` (the agent's socket, default upstream's
/var/run/istio-cni/pluginevent.sock) and `timeout_seconds` (default 30).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any, NoReturn, TextIO

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
DEFAULT_SOCKET = "/var/run/istio-cni/pluginevent.sock"
DEFAULT_TIMEOUT = 30.0

# CNI spec error codes
ERR_INCOMPATIBLE_VERSION = 1
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_ENROLMENT_FAILED = 100  # plugin-specific (>= 100)


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def parse_cni_args(value: str) -> dict[str, str]:
    """CNI_ARGS: `K1=V1;K2=V2`."""
    out: dict[str, str] = {}
    for part in value.split(";"):
        if "=" in part:
            key, _, val = part.partition("=")
            out[key.strip()] = val.strip()
    return out


def prev_result_ips(prev: Mapping[str, Any]) -> list[dict[str, str]]:
    """The IPs of a CNI result (1.0: ips[].address / gateway / interface index into interfaces[])."""
    interfaces = prev.get("interfaces") or []
    ips: list[dict[str, str]] = []
    for ip in prev.get("ips") or []:
        if not isinstance(ip, dict) or "address" not in ip:
            continue
        entry = {"Address": str(ip["address"])}
        if ip.get("gateway"):
            entry["Gateway"] = str(ip["gateway"])
        idx = ip.get("interface")
        if isinstance(idx, int) and 0 <= idx < len(interfaces) and isinstance(interfaces[idx], dict):
            entry["Interface"] = str(interfaces[idx].get("name", ""))
        ips.append(entry)
    return ips


def post_cmdadd(path: str, body: dict[str, Any], timeout: float) -> tuple[int, str]:
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request("POST", "/cmdadd", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def cmd_add(env: Mapping[str, str], config: dict[str, Any]) -> dict[str, Any]:
    """Forward ADD; return the result to print (the prevResult, or an empty result for a first plugin)."""
    version = str(config.get("cniVersion", "1.0.0"))
    prev = config.get("prevResult")
    result: dict[str, Any] = (
        dict(prev) if isinstance(prev, dict) else {"cniVersion": version, "interfaces": [], "ips": []}
    )
    result["cniVersion"] = version
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    name, namespace = args.get("K8S_POD_NAME", ""), args.get("K8S_POD_NAMESPACE", "")
    if not name or not namespace:
        return result  # not a Kubernetes pod (or a runtime without pod args): nothing to enrol, like upstream
    netns = env.get("CNI_NETNS", "")
    if not netns:
        raise CniError(ERR_INVALID_ENV, "CNI_NETNS is not set", "the runtime must pass the pod's netns path")
    body: dict[str, Any] = {
        "Netns": netns,
        "PodName": name,
        "PodNamespace": namespace,
        "IPs": prev_result_ips(prev) if isinstance(prev, dict) else [],
    }
    if args.get("K8S_POD_UID"):
        body["PodUID"] = args["K8S_POD_UID"]
    path = str(config.get("cni_event_address") or DEFAULT_SOCKET)
    timeout = float(config.get("timeout_seconds") or DEFAULT_TIMEOUT)
    try:
        status, text = post_cmdadd(path, body, timeout)
    except (OSError, http.client.HTTPException) as exc:
        raise CniError(
            ERR_TRY_AGAIN,
            f"cannot reach the ambient node agent at {path}: {exc}",
            "is node-agent running on this node? (its --cni-socket must match cni_event_address)",
        ) from None
    if not 200 <= status < 300:
        try:
            detail = str(json.loads(text).get("error", text))
        except (ValueError, AttributeError):
            detail = text.strip()
        raise CniError(
            ERR_ENROLMENT_FAILED,
            f"ambient node agent refused pod {namespace}/{name} (HTTP {status})",
            detail,
        )
    return result


def run(env: Mapping[str, str], stdin: TextIO, stdout: TextIO) -> int:
    """The plugin, with its inputs passed in (for tests). Returns the exit status."""
    command = env.get("CNI_COMMAND", "")
    version = "1.0.0"
    try:
        if command == "VERSION":
            json.dump({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}, stdout)
            return 0
        if command not in ("ADD", "DEL", "CHECK", "GC", "STATUS"):
            raise CniError(
                ERR_INVALID_ENV, f"unknown CNI_COMMAND {command!r}", "expected ADD, DEL, CHECK or VERSION"
            )
        raw = stdin.read()
        try:
            config = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            raise CniError(ERR_DECODE, "cannot decode the network configuration on stdin", str(exc)) from None
        if not isinstance(config, dict):
            raise CniError(ERR_INVALID_CONFIG, "the network configuration must be a JSON object")
        version = str(config.get("cniVersion", "1.0.0"))
        if version not in SUPPORTED_VERSIONS:
            raise CniError(
                ERR_INCOMPATIBLE_VERSION,
                f"unsupported cniVersion {version}",
                f"supported: {SUPPORTED_VERSIONS}",
            )
        if command == "ADD":
            json.dump(cmd_add(env, config), stdout)
        return 0
    except CniError as exc:
        json.dump({"cniVersion": version, "code": exc.code, "msg": exc.msg, "details": exc.details}, stdout)
        return 1


def main() -> NoReturn:
    status = run(os.environ, sys.stdin, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    sys.exit(status)
