"""Errors the ``sasformer`` command reports as a message, without a traceback."""

from __future__ import annotations


class RunStoppedError(RuntimeError):
    """A run stopped by one of its own checks (a NaN loss, say); the message says what happened and what to do."""
