"""Errors shared by every service: a base class whose message is written for an operator."""

from __future__ import annotations


class AmbientError(Exception):
    """Base for errors an operator can act on; str(exc) is the whole message, hint included."""
