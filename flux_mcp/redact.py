"""Keeping secrets and private data out of logs, results, sidecars and job files.

Two tools:

- ``Redactor``: blanks out secret values (FAL_KEY, the HTTP token) in any text, in every form they
  take on the way to a log line: as given, each line and each ``id:secret`` part of them, the escaped
  forms ``repr()``, JSON and URL-encoding produce (a key with a newline shows up as ``\\n``), and any
  run of ``FRAGMENT`` characters of them (a truncated key in a traceback). ``install_log_scrubbing``
  applies it to every log record of the process, message and exception text alike: at the record
  factory (so handlers added later, such as uvicorn's, get scrubbed records) and at the handlers'
  formatters (so text a formatter adds is scrubbed too). A process-global effect, made from the one
  place the faces set up logging.
- ``public_url``: a URL as results, sidecars and job files may keep it: no query or fragment (signed
  URLs carry their token there), no ``user:password@``; a data URI as its MIME type and size.

This module knows nothing about settings, MCP or the backends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterable
from urllib.parse import quote, urlsplit

__all__ = ["FRAGMENT", "Redactor", "install_log_scrubbing", "public_url"]

#: Any run of this many characters of a secret is blanked out (shorter secrets are blanked whole).
FRAGMENT = 8
MASK = "***"
_DATA_MIME = re.compile(r"^data:([\w.+-]+/[\w.+-]+)", re.I)


class Redactor:
    """Replaces every form of the given secrets in text by ``***``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            for piece in _pieces(secret):
                forms.update(_spellings(piece))
        # Longest first, so a whole key is replaced before its fragments are looked for.
        ordered = sorted((f for f in forms if len(f) >= 4), key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, text: str) -> str:
        return text if self._pattern is None else self._pattern.sub(MASK, text)

    def __bool__(self) -> bool:
        """Whether there is anything to scrub (no secrets configured: nothing)."""
        return self._pattern is not None


def _pieces(secret: str) -> set[str]:
    """The secret, its lines and its ``:``-separated parts, and every FRAGMENT-long run of them."""
    pieces = {secret}
    for line in re.split(r"[\r\n]+", secret):
        pieces.add(line)
        pieces.update(line.split(":"))
    pieces = {p.strip() for p in pieces if len(p.strip()) >= 6}
    runs = {p[i : i + FRAGMENT] for p in pieces if len(p) > FRAGMENT for i in range(len(p) - FRAGMENT + 1)}
    return pieces | runs


def _spellings(piece: str) -> set[str]:
    """How ``piece`` may be written out: as is, by repr(), by JSON, escaped, URL-encoded."""
    return {
        piece,
        repr(piece)[1:-1],
        json.dumps(piece)[1:-1],
        piece.encode("unicode_escape").decode("ascii"),
        quote(piece, safe=""),
    }


class _ScrubbingFormatter(logging.Formatter):
    """Formats with the handler's own formatter, then scrubs the whole line (exception text included)."""

    def __init__(self, inner: logging.Formatter | None, redact: Redactor) -> None:
        super().__init__()
        self._inner = inner or logging.Formatter()
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(self._inner.format(record))


def install_log_scrubbing(secrets: Iterable[str], handlers: Iterable[logging.Handler]) -> Redactor:
    """Scrub every log record of this process and every line ``handlers`` write."""
    redact = Redactor(secrets)
    if not redact:
        return redact
    make_record = logging.getLogRecordFactory()

    def scrubbed_record(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        # A broken format string raises here: left as it is, the handler reports it (scrubbed, below).
        with contextlib.suppress(Exception):
            record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return record

    logging.setLogRecordFactory(scrubbed_record)
    for handler in handlers:
        if not isinstance(handler.formatter, _ScrubbingFormatter):
            handler.setFormatter(_ScrubbingFormatter(handler.formatter, redact))
    return redact


_OMITTED = re.compile(r"<\d+ bytes omitted>")


def public_url(text: str) -> str:
    """``text`` without what must not be stored: a URL's query, fragment and credentials, a data URI's
    payload (and any header past its MIME type). Other strings (paths, ids, repo ids) are returned as is."""
    lowered = text[:8].lower()
    if lowered.startswith("data:"):
        head, _, payload = text.partition(",")
        if _OMITTED.fullmatch(payload):
            return text  # already in this form
        mime = _DATA_MIME.match(head)
        return f"data:{mime.group(1) if mime else 'unknown'};base64,<{len(payload) * 3 // 4} bytes omitted>"
    if not lowered.startswith(("http://", "https://")):
        return text
    try:
        parts = urlsplit(text)
        host = parts.netloc.rsplit("@", 1)[-1]
    except ValueError:
        return "<an unparsable URL>"
    return f"{parts.scheme}://{host}{parts.path}"
