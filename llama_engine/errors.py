"""The error a request gets when the engine refuses it: a leaf, so every layer (sampling
parameters, the engine, a server in front of them) raises and reads the same type."""
from __future__ import annotations


class RequestValidationError(ValueError):
    """A request the engine will not run. ``field`` names the offending request parameter
    in the engine's vocabulary (a ``SamplingParams`` field or ``prompt``); ``reason`` says
    what is wrong with it. ``str()`` is ``"field: reason"``."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFoundError(KeyError):
    """A lookup of something the caller named (a dataset, a job) that does not exist.
    ``str()`` is the message itself: a plain KeyError would show it quoted."""

    default_message = "not found"

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.default_message
