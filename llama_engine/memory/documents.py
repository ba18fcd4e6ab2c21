"""Documents: bytes with a mime type -> the plain text that gets chunked and embedded.

Text types are decoded strictly (UTF-8 unless the mime type names a charset); HTML keeps
only the text a browser shows; CSV rows and JSON values become ``name: value`` lines so a
keyword or a paraphrase finds the row that holds it; PDF text comes from pypdf.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, Callable

from llama_engine.memory.errors import InvalidInputError, UnsupportedMimeTypeError

DEFAULT_CHARSET = "utf-8"


@dataclass
class Document:
    """One document of a bank: its bytes as given, how to read them, and free metadata."""

    uuid: str
    content: bytes
    mime_type: str = "text/plain"
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_text(cls, uuid: str, text: str, mime_type: str = "text/plain",
                  metadata: dict[str, Any] | None = None) -> "Document":
        return cls(uuid, text.encode("utf-8"), mime_type, dict(metadata or {}))


def parse_mime_type(mime_type: str) -> tuple[str, dict[str, str]]:
    """``"text/plain; charset=latin-1"`` -> ``("text/plain", {"charset": "latin-1"})``."""
    essence, *params = [part.strip() for part in mime_type.split(";")]
    parsed = {}
    for param in params:
        name, _, value = param.partition("=")
        parsed[name.strip().lower()] = value.strip().strip('"')
    return essence.lower(), parsed


def _decode(content: bytes, params: dict[str, str], field_name: str) -> str:
    charset = params.get("charset", DEFAULT_CHARSET)
    try:
        return content.decode(charset)
    except LookupError:
        raise InvalidInputError(field_name.replace(".content", ".mime_type"),
                                f"unknown charset {charset!r}") from None
    except UnicodeDecodeError as exc:
        raise InvalidInputError(field_name, f"not valid {charset} text (byte {exc.start})") from None


class _VisibleText(HTMLParser):
    """Collects the text of an HTML page a reader sees: no scripts, styles or head."""

    HIDDEN = {"script", "style", "head", "title", "template", "noscript", "svg"}
    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section",
              "article", "header", "footer", "blockquote", "pre", "table", "ul", "ol", "hr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self.HIDDEN:
            self.hidden_depth += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n\n" if tag not in ("br", "li", "tr") else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden_depth = max(0, self.hidden_depth - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n" if tag not in ("br", "li", "tr") else "\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden_depth:
            self.parts.append(data)


def _html_text(content: bytes, params: dict[str, str], field_name: str) -> str:
    parser = _VisibleText()
    parser.feed(_decode(content, params, field_name))
    parser.close()
    paragraphs = ("".join(parser.parts)).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def _csv_text(content: bytes, params: dict[str, str], field_name: str) -> str:
    rows = list(csv.reader(io.StringIO(_decode(content, params, field_name))))
    if not rows:
        return ""
    header, body = rows[0], rows[1:]
    if not body:
        return ", ".join(header)
    lines = []
    for row in body:
        cells = [f"{name}: {value}" for name, value in zip(header, row) if value.strip()]
        lines.append("; ".join(cells) + ".")
    return "\n".join(lines)


def _json_lines(value: Any, path: str, out: list[str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _json_lines(item, f"{path}.{key}" if path else str(key), out)
    elif isinstance(value, list):
        for item in value:
            _json_lines(item, path, out)
    elif value is not None:
        out.append(f"{path}: {value}." if path else f"{value}.")


def _json_text(content: bytes, params: dict[str, str], field_name: str) -> str:
    try:
        value = json.loads(_decode(content, params, field_name))
    except json.JSONDecodeError as exc:
        raise InvalidInputError(field_name, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    lines: list[str] = []
    _json_lines(value, "", lines)
    return "\n".join(lines)


def _pdf_text(content: bytes, params: dict[str, str], field_name: str) -> str:
    from pypdf import PdfReader  # imported on first PDF: keeps start-up light
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(content))
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(field_name, f"not a readable PDF ({exc})") from None
    return "\n\n".join(page.strip() for page in pages if page.strip())


Extractor = Callable[[bytes, dict[str, str], str], str]
EXTRACTORS: dict[str, Extractor] = {
    "text/plain": _decode,
    "text/markdown": _decode,
    "text/html": _html_text,
    "text/csv": _csv_text,
    "application/json": _json_text,
    "application/pdf": _pdf_text,
}
SUPPORTED_MIME_TYPES = tuple(EXTRACTORS)


def extract_text(document: Document, field_name: str) -> str:
    """The document's readable text. ``field_name`` (``documents[3]``) prefixes errors.

    Raises UnsupportedMimeTypeError for a type outside SUPPORTED_MIME_TYPES,
    InvalidInputError for undecodable content or content with no text."""
    essence, params = parse_mime_type(document.mime_type or "")
    extractor = EXTRACTORS.get(essence)
    if extractor is None:
        raise UnsupportedMimeTypeError(
            f"{field_name}.mime_type",
            f"unsupported mime type {document.mime_type!r} (supported: {', '.join(SUPPORTED_MIME_TYPES)})")
    text = extractor(document.content, params, f"{field_name}.content")
    if not text.strip():
        raise InvalidInputError(f"{field_name}.content", "the document has no text")
    return text
