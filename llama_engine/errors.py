"""The error a request gets when the engine refuses it: a leaf, so every layer (sampling
parameters, the engine, a server in front of them) raises and reads the same type."""
from __future__ import annotations

import re
from typing import Callable

_MENTION = re.compile(r"`(\w+)`")  # an option named inside a RecipeError's reason


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


class RecipeError(RequestValidationError):
    """A training run refused. ``field`` is the recipe's name of the option at fault (a
    ``training.recipe.Recipe``, ``TrainingOptions`` or ``DPOParams`` field, or a key of the
    adapter config); ``reason`` names any other option it involves in backticks (`fsdp`).
    Each front end names options its own way through ``render``: the CLI its flags, the
    HTTP API its request fields. ``str()`` keeps the recipe's names."""

    def __init__(self, field: str, reason: str):
        super().__init__(field, reason)
        self.args = (self.render(lambda option: option),)

    def render(self, name: Callable[[str], str]) -> str:
        """``"field: reason"`` with every option (the field, each `option` in the reason)
        called ``name(option)``."""
        return f"{name(self.field)}: " + _MENTION.sub(lambda m: name(m[1]), self.reason)
