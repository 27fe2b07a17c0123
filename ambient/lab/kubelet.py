"""`python -m ambient.lab.kubelet --run-dir DIR`: the kubelet of a `lab up --kubernetes` lab, for the pods
the API server gets after `up` and for every pod's deletion.

Theory of operation
-------------------
One process for all of the lab's nodes, in the host namespace (it creates pod namespaces there, as the
kubelet and the container runtime do); it reaches the API server from inside the control-plane namespace
(kubeapi.py). It lists all pods, then watches them (bookmarks; an ERROR event or a failed request: list
again after a back-off), and for each pod bound to one of the lab's nodes:

    no IP yet, not one of up's pods   take the next free address of the node's pod range, make the netns
                                      (resolv.conf, the node agent's link), the veth into the node's
                                      bridge, address and route; then patch the status: Running, podIP
    deletionTimestamp set             stop its app (up's pods), delete its netns; then delete the object
                                      for good (grace period 0), as the kubelet does once a pod is down
    gone (DELETED, or missing from a new listing)   the same clean-up, if it was not done already

Pods that `up` ran (their uids are in the lab's plan) are `up`'s until they are deleted; pods on a node the
lab does not have are left alone. Every pod it touches is written to <run>/kube/kubelet.json *before* its
namespace is made, so `lab down` removes those namespaces too. Pods it runs get no app: they are network
sandboxes (netns, veth, address) that the node agent can enrol and `lab status` lists.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from ambient.lab import components
from ambient.lab.cluster_dns import pod_resolv_conf
from ambient.lab.components import LabPaths
from ambient.lab.kube import container_names, lab_api, running_status
from ambient.lab.kubeapi import KubeRequestError, KubeRequests
from ambient.lab.state import LabState, stop_process
from ambient.lab.topology import (
    ETC_NETNS,
    AppPlan,
    LabPlan,
    PodPlan,
    create_pod_netns,
    delete_netns,
    pod_netns_name,
    remove_tree,
    veth_name,
    wire_pod,
)
from services.node_agent.eligibility import decide
from services.node_agent.model import Pod as AgentPod
from shared.errors import AmbientError
from shared.zds.types import PodUid

BACKOFF_INITIAL, BACKOFF_MAX = 0.5, 10.0


class KubeletPod(msgspec.Struct, kw_only=True):
    key: str
    uid: str
    node: str
    netns: str
    ip: str
    state: str  # creating (netns and veth being made) | running | deleted
    from_plan: bool = False  # one of `up`'s pods (the kubelet only removed it)


class KubeletRecord(msgspec.Struct, kw_only=True):
    pods: list[KubeletPod] = []

    def find(self, uid: str) -> KubeletPod | None:
        return next((p for p in self.pods if p.uid == uid), None)


def load_record(paths: LabPaths) -> KubeletRecord:
    try:
        return msgspec.json.decode(paths.kubelet_record.read_bytes(), type=KubeletRecord)
    except (FileNotFoundError, msgspec.DecodeError):
        return KubeletRecord()


def save_record(paths: LabPaths, record: KubeletRecord) -> None:
    """Atomically (temp file + rename)."""
    tmp = paths.kubelet_record.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(record)))
    os.replace(tmp, paths.kubelet_record)


def load_lab(run_dir: Path) -> LabState:
    return msgspec.json.decode((run_dir / "state.json").read_bytes(), type=LabState)


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} kubelet: {message}", flush=True)


def free_address(cidr: str, used: Iterable[str]) -> str | None:
    """The lowest address of `cidr` past its gateway (.1) that is not in `used`; None when it is full."""
    taken = set(used)
    hosts = list(ipaddress.IPv4Network(cidr).hosts())[1:]
    return next((str(ip) for ip in hosts if str(ip) not in taken), None)


def sandbox_plan(plan: LabPlan, obj: Mapping[str, Any], ip: str) -> PodPlan:
    """The PodPlan of a pod the kubelet runs: its netns, veth and address (`ip`), no app."""
    meta, spec = obj["metadata"], obj.get("spec") or {}
    node = plan.node(str(spec["nodeName"]))
    namespace, name = str(meta["namespace"]), str(meta["name"])
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    annotations = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
    account = str(spec.get("serviceAccountName") or "default")
    agent_pod = AgentPod(uid=PodUid(str(meta["uid"])), name=name, namespace=namespace,
                         service_account=account, labels=labels, annotations=annotations)  # fmt: skip
    decision = decide(agent_pod, {})
    prefix_len = ipaddress.IPv4Network(node.pod_cidr).prefixlen
    return PodPlan(
        name=name, namespace=namespace, uid=str(meta["uid"]), node=node.name,
        netns=pod_netns_name(plan.prefix, namespace, name), host_veth=veth_name(f"{namespace}/{name}"),
        address=f"{ip}/{prefix_len}", gateway=node.gateway.split("/")[0], service_account=account,
        labels=labels, annotations=annotations, ambient=decision.eligible, ambient_reason=decision.reason,
        resolv_conf=pod_resolv_conf(namespace), app=AppPlan(kind="none"),
    )  # fmt: skip


class Kubelet:
    """The lab kubelet's decisions and actions (see the module docstring)."""

    def __init__(self, run_dir: Path, api: KubeRequests | None = None) -> None:
        self.paths = LabPaths(run_dir)
        state = load_lab(run_dir)
        self.plan = msgspec.json.decode(state.plan, type=LabPlan)
        self.api: KubeRequests = api or lab_api(self.plan, self.paths)
        self.record = load_record(self.paths)
        self.seen: dict[str, dict[str, Any]] = {}
        """uid -> the pod object as last listed or watched"""
        self.nodes = {n.name for n in self.plan.nodes}

    def plan_pod(self, uid: str) -> PodPlan | None:
        return next((p for p in self.plan.pods if p.uid == uid), None)

    def listed(self, items: Sequence[Mapping[str, Any]]) -> None:
        fresh = {str(o["metadata"]["uid"]): dict(o) for o in items}
        for uid, obj in list(self.seen.items()):
            if uid not in fresh:
                self.gone(obj)
        self.seen = fresh
        for uid in list(fresh):
            self.changed(fresh[uid])
        # pods this kubelet ran or up made that the listing no longer has (deleted while it was down)
        for pod in [p for p in self.record.pods if p.state == "running" and p.uid not in fresh]:
            self.remove(pod.key, pod.uid)
        for plan_pod in (p for p in self.plan.pods if p.uid not in fresh):
            self.remove(plan_pod.key, plan_pod.uid)

    def changed(self, obj: Mapping[str, Any]) -> None:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        uid, key = str(meta["uid"]), f"{meta['namespace']}/{meta['name']}"
        self.seen[uid] = dict(obj)
        if spec.get("nodeName") not in self.nodes or spec.get("hostNetwork"):
            return
        if meta.get("deletionTimestamp"):
            self.remove(key, uid)
            self.finish_delete(meta)
            return
        if status.get("podIP") or self.plan_pod(uid) is not None:
            return
        known = self.record.find(uid)
        if known is not None and known.state == "running":
            patch = running_status(known.ip, self.plan.node(known.node).ip, container_names(obj))
            self.api.patch_status(meta["namespace"], meta["name"], patch)
            return
        self.run_pod(obj)

    def gone(self, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        self.seen.pop(str(meta["uid"]), None)
        self.remove(f"{meta['namespace']}/{meta['name']}", str(meta["uid"]))

    def used_addresses(self) -> set[str]:
        removed = {p.uid for p in self.record.pods if p.state == "deleted"}
        used = {p.ip for p in self.plan.pods if p.uid not in removed}
        used |= {p.ip for p in self.record.pods if p.state != "deleted"}
        for obj in self.seen.values():
            status = obj.get("status") or {}
            used |= {str(i.get("ip")) for i in status.get("podIPs") or [] if isinstance(i, Mapping)}
        return used

    def run_pod(self, obj: Mapping[str, Any]) -> None:
        """Netns, veth and address, then the Running status. A pod whose sandbox was left half made (the
        kubelet stopped, a command failed) is made again from scratch, with the same address."""
        meta = obj["metadata"]
        node = self.plan.node(str(obj["spec"]["nodeName"]))
        key, uid = f"{meta['namespace']}/{meta['name']}", str(meta["uid"])
        half = self.record.find(uid)
        if half is not None:  # state "creating"
            delete_netns(half.netns)
            self.record.pods.remove(half)
        ip = half.ip if half is not None else free_address(node.pod_cidr, self.used_addresses())
        if ip is None:
            say(f"pod {key}: node {node.name}'s pod range {node.pod_cidr} is full; the pod stays pending")
            return
        pod = sandbox_plan(self.plan, obj, ip)
        # an earlier pod of this name that this kubelet ran and removed: its record goes, the netns is reused
        self.record.pods = [p for p in self.record.pods
                            if p.netns != pod.netns or p.state != "deleted" or p.from_plan]  # fmt: skip
        made = KubeletPod(key=key, uid=uid, node=node.name, netns=pod.netns, ip=ip, state="creating")
        self.record.pods.append(made)
        save_record(self.paths, self.record)
        create_pod_netns(pod, on_netns=lambda _: None, on_file=lambda _: None)
        components.link_pod_netns(self.paths, node.name, pod.netns)
        wire_pod(self.plan, pod)
        made.state = "running"
        save_record(self.paths, self.record)
        self.api.patch_status(pod.namespace, pod.name, running_status(ip, node.ip, container_names(obj)))
        say(f"pod {key} running on {node.name}: {ip}, netns {pod.netns}")

    def remove(self, key: str, uid: str) -> None:
        """Stop the pod's app (up's pods) and remove its netns, once."""
        known = self.record.find(uid)
        if known is not None and known.state == "deleted":
            return
        plan_pod = self.plan_pod(uid)
        if known is None and plan_pod is None:
            return
        if known is None:
            assert plan_pod is not None
            known = KubeletPod(key=key, uid=uid, node=plan_pod.node, netns=plan_pod.netns, ip=plan_pod.ip,
                               state="running", from_plan=True)  # fmt: skip
            self.record.pods.append(known)
            state = load_lab(self.paths.run_dir)
            app = state.process(f"app/{key}")
            if app is not None:
                stop_process(app)
        delete_netns(known.netns)
        remove_tree(ETC_NETNS / known.netns)
        remove_tree(self.paths.pod_netns_link(known.node, known.netns))
        known.state = "deleted"
        save_record(self.paths, self.record)
        say(f"pod {key} removed from {known.node}: netns {known.netns} deleted")

    def finish_delete(self, meta: Mapping[str, Any]) -> None:
        """Delete the object for good now that the pod is down (grace period 0, this uid only)."""
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                "preconditions": {"uid": meta["uid"]}}  # fmt: skip
        try:
            self.api.request("DELETE", path, body)
        except KubeRequestError as exc:
            if exc.status not in (404, 409):  # gone already, or another pod of that name by now
                raise

    def run(self) -> None:
        backoff = BACKOFF_INITIAL
        while True:
            try:
                listing = self.api.get("/api/v1/pods")
                self.listed(listing.get("items") or [])
                version = str((listing.get("metadata") or {}).get("resourceVersion", ""))
                say(f"listed {len(self.seen)} pods at version {version}")
                backoff = BACKOFF_INITIAL
                version = self.watch(version)
            except (KubeRequestError, AmbientError, KeyError, TypeError, ValueError) as exc:
                # a failed request or command, or an object of a shape it cannot read: list again later
                say(f"{type(exc).__name__}: {exc}; listing again in {backoff:g} s")
                time.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def watch(self, version: str) -> str:
        """Watch from `version` until the server ends a watch with an error; returns the version reached."""
        while True:
            for event in self.api.watch("/api/v1/pods", version):
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    say(f"watch ended: {obj.get('message', obj)}; listing again")
                    return version
                version = str((obj.get("metadata") or {}).get("resourceVersion", version))
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    self.gone(obj)
                else:
                    self.changed(obj)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ambient.lab.kubelet", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, type=Path, help="the lab's run directory")
    args = p.parse_args(argv)
    try:
        kubelet = Kubelet(args.run_dir)
    except (OSError, msgspec.DecodeError) as exc:
        print(f"kubelet: cannot read the lab's state in {args.run_dir}: {exc}", file=sys.stderr)
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        kubelet.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
