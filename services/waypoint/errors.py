"""The waypoint's error vocabulary, written for the operator who reads it."""

from __future__ import annotations

from shared.errors import AmbientError


class WaypointConfigError(AmbientError):
    """A setting is missing or malformed; the message names the variable and what to set."""
