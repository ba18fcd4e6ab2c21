"""What the memory store refuses, each naming the field at fault; the server maps each
class to its HTTP status (the comment beside it)."""
from __future__ import annotations


class MemoryBankError(ValueError):
    """A request the store refuses: ``field`` names what was wrong (``bank_uuid``,
    ``documents[2].content``...), the message says why."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class InvalidInputError(MemoryBankError):
    """Malformed input: bad base64, empty or non-UTF-8 text, a value out of range (400)."""


class NotFoundError(MemoryBankError):
    """No such bank or document (404)."""


class AlreadyExistsError(MemoryBankError):
    """A bank or document uuid that is already taken (409)."""


class DocumentTooLargeError(MemoryBankError):
    """A document over the store's size limit (413)."""


class UnsupportedMimeTypeError(MemoryBankError):
    """A mime type the store cannot extract text from (415)."""
