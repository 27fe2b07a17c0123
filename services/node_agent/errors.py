"""Errors of the node agent, each written for the operator who reads the log or the CNI plugin's output."""

from __future__ import annotations

from shared.errors import AmbientError


class NodeAgentError(AmbientError):
    """Base of every node-agent error; str(exc) is the whole operator-facing message."""


class PodConfigError(NodeAgentError):
    """A pod's annotations or fields cannot be turned into redirection rules (bad value or interface)."""


class RuleApplyError(NodeAgentError):
    """Installing or removing redirection inside a pod's network namespace failed.

    When raised by an apply, whatever part had been installed was rolled back first.
    """


class NetnsGoneError(NodeAgentError):
    """The pod's network namespace does not exist (any more) or is not a network namespace."""


class EnrolmentError(NodeAgentError):
    """A pod could not be enrolled. `retryable` says whether trying again later can succeed
    (ztunnel absent or NACKing) or not (bad netns, rules could not be installed)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class CniRequestError(NodeAgentError):
    """A CNI-event request is malformed (missing fields, wrong types): a 400 with this text."""


class StartupCheckError(NodeAgentError):
    """The agent cannot run here: a capability or binary is missing; the message says how to fix."""


class ConfigError(NodeAgentError):
    """A flag or environment variable has an invalid value."""
