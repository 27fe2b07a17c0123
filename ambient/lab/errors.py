"""Errors of the lab, written for the operator running `ambient lab ...`."""

from __future__ import annotations

from shared.errors import AmbientError


class LabError(AmbientError):
    """Base for every lab error; str() is the whole message, hint included."""


class PlanError(LabError):
    """The world cannot be laid out as a lab (addresses outside the pod range, overlapping CIDRs, ...).

    Raised before anything is created; the message names the world file, the path inside it and the problem.
    """

    def __init__(self, source: str, path: str, problem: str) -> None:
        super().__init__(f"{source}: {path}: {problem}")
        self.source = source
        self.path = path
        self.problem = problem


class PrerequisiteError(LabError):
    """The host cannot run the lab: not root, or a needed binary is missing."""


class AlreadyUpError(LabError):
    """A lab with this prefix exists already (its state file or one of its namespaces)."""


class NotUpError(LabError):
    """No lab with this prefix is up (no state file)."""


class CommandError(LabError):
    """A command the lab ran to build the topology failed; the message has the command and its stderr."""


class ComponentError(LabError):
    """A component (istiod, node-agent, ztunnel, an app) did not start or did not become ready in time.

    The message names the component and its log file.
    """


class EnrolmentError(LabError):
    """The node agent refused a pod's CNI ADD, or the pod did not become enrolled in time."""


class UnknownPodError(LabError):
    """`lab exec POD` names no pod, or more than one."""
