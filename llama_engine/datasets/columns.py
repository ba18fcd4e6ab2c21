"""Column types (the spec's ``dialog`` / ``text`` / ``media`` / ``number`` / ``json``), the
check of a dataset's rows against its declared ``columns``, and the columns each trainer reads.

Trainer columns:
- SFT: ``dialog`` (a list of messages ``{role, content}``; only assistant turns carry loss)
  or ``text`` (plain language modelling).
- DPO and reward modelling: ``prompt`` (a dialog, or text), ``chosen`` and ``rejected``
  (text: the assistant's preferred and dispreferred replies).
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional

COLUMN_TYPES = ("dialog", "text", "media", "number", "json")
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
URL_PATTERN = re.compile(r"^(https?://|file://|data:)")
SFT, PREFERENCE = "sft", "preference"
# task -> alternatives, each a {column: allowed types} that must all be declared
TRAINER_COLUMNS: dict[str, list[dict[str, tuple[str, ...]]]] = {
    SFT: [{"dialog": ("dialog",)}, {"text": ("text",)}],
    PREFERENCE: [{"prompt": ("dialog", "text"), "chosen": ("text",), "rejected": ("text",)}],
}


class DatasetValidationError(ValueError):
    """Data that does not fit: ``column`` and ``row`` (0-based) say where, when known."""

    def __init__(self, message: str, column: Optional[str] = None, row: Optional[int] = None):
        super().__init__(message)
        self.column, self.row = column, row


def _content_problem(content: Any) -> Optional[str]:
    if isinstance(content, str):
        return None
    if isinstance(content, dict):
        return None if isinstance(content.get("url"), str) else "an attachment needs a 'url'"
    if isinstance(content, list):
        for item in content:
            problem = _content_problem(item) if not isinstance(item, list) else "nested list"
            if problem:
                return problem
        return None
    return f"content must be text, an attachment or a list of them, got {type(content).__name__}"


def _dialog_problem(value: Any) -> Optional[str]:
    if not isinstance(value, list) or not value:
        return f"expected a non-empty list of messages {{role, content}}, got {_kind(value)}"
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f"message {i}: expected an object {{role, content}}, got {_kind(message)}"
        if message.get("role") not in MESSAGE_ROLES:
            return f"message {i}: role must be one of {', '.join(MESSAGE_ROLES)}, got {message.get('role')!r}"
        if "content" not in message:
            return f"message {i}: no 'content'"
        problem = _content_problem(message["content"])
        if problem:
            return f"message {i}: {problem}"
    return None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def value_problem(column_type: str, value: Any) -> Optional[str]:
    """Why ``value`` is not a valid ``column_type`` value, or None if it is."""
    if column_type == "json":
        return None
    if value is None:
        return "missing value (null)"
    if column_type == "text":
        return None if isinstance(value, str) else f"expected text, got {_kind(value)}"
    if column_type == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {_kind(value)}"
        return None if math.isfinite(value) else "expected a finite number"
    if column_type == "media":
        if isinstance(value, str):
            return None if URL_PATTERN.match(value) else "expected a URL (http(s)://, file:// or data:)"
        if isinstance(value, dict) and isinstance(value.get("url"), str):
            return None
        return f"expected a URL or an attachment {{url, mime_type}}, got {_kind(value)}"
    if column_type == "dialog":
        return _dialog_problem(value)
    raise ValueError(f"unknown column type {column_type!r}; known: {', '.join(COLUMN_TYPES)}")


def check_columns(rows: list[dict], columns: dict[str, str]) -> None:
    """Every declared column is in every row with a value of its type. Raises
    DatasetValidationError naming the first offending column and row (0-based)."""
    if not rows:
        raise DatasetValidationError("content: the dataset has no rows")
    for name, column_type in columns.items():
        if column_type not in COLUMN_TYPES:
            raise DatasetValidationError(
                f"column {name!r}: unknown type {column_type!r}; known: {', '.join(COLUMN_TYPES)}",
                column=name)
    for index, row in enumerate(rows):
        for name, column_type in columns.items():
            if name not in row:
                raise DatasetValidationError(f"column {name!r}, row {index}: missing",
                                             column=name, row=index)
            problem = value_problem(column_type, row[name])
            if problem:
                raise DatasetValidationError(f"column {name!r}, row {index}: {problem}",
                                             column=name, row=index)


def check_trainer_columns(columns: dict[str, str], task: str) -> dict[str, str]:
    """The columns the ``task`` (SFT or PREFERENCE) trainer will read, as {name: type}.
    Raises DatasetValidationError naming the missing or wrongly typed column."""
    problems = []
    for alternative in TRAINER_COLUMNS[task]:
        missing = [n for n in alternative if n not in columns]
        wrong = [f"{n!r} must be {' or '.join(alternative[n])}, is {columns[n]!r}"
                 for n in alternative if n in columns and columns[n] not in alternative[n]]
        if not missing and not wrong:
            return {n: columns[n] for n in alternative}
        problems.append((missing, wrong))
    missing, wrong = problems[0]
    options = " or ".join("+".join(a) for a in TRAINER_COLUMNS[task])
    column = (missing or [w.split("'")[1] for w in wrong])[0]
    reason = f"missing column {column!r}" if missing else wrong[0]
    raise DatasetValidationError(f"columns: {reason} ({task} training reads {options})",
                                 column=column)
