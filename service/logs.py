"""The service's log lines: one JSON object each (:class:`JsonFormatter`, what ``tcm-serve``
writes), and the redaction of secrets-shaped values in what a client sent (:func:`redact_target`).

A log record may carry structured fields (``log.info(msg, extra={"fields": {...}})``): the JSON
line is then those fields, else the formatted message. Either way the line holds ``ts``,
``level`` and ``logger``, and a traceback, if any, as one escaped string: one record, one line.

Clients paste secrets where they do not belong (``GET /v1/gallery/<api key>``,
``?token=<admin token>``), so a request's path and query are logged only after
:func:`redact_target`: every path segment, query name or query value that looks like a secret
becomes ``[redacted]``; the values of suspicious query names (``token``, ``key``, ``api_key``,
``authorization``, ``secret``, ``password``, and ``*_token``, ``*_key``, ...) always do. Looks
like a secret: contains a tenant API key (``tcm_<16 hex>_<secret>``, also truncated or
tampered), one of the process's own secrets (the admin token), a ``Bearer`` credential, or a
long random-looking token (a run of 32+ base64url characters with 4+ upper case and 4+ lower
case letters). Ids stay visible: they are short, or hex, or of one case (a long mixed-case id is
redacted: the safe side). A random secret of one case (hex) is not recognised by its shape.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, unquote_plus

REDACTED = "[redacted]"
MAX_TARGET_CHARS = 2048

SECRET_QUERY_NAMES = frozenset(
    {
        "token",
        "key",
        "api_key",
        "apikey",
        "authorization",
        "auth",
        "secret",
        "password",
        "passwd",
        "pwd",
        "access_token",
        "credentials",
    }
)
_SECRET_NAME_SUFFIXES = ("_token", "_key", "_secret", "_password")
# a tenant API key, whole or cut short: tcm_<key_id>_<secret> (service.domain.tenants)
_TENANT_KEY = re.compile(r"tcm_[0-9a-fA-F]{16}_[A-Za-z0-9_-]{8,}")
_LONG_RUN = re.compile(r"[A-Za-z0-9_\-+=~]{32,}")
_BEARER = re.compile(r"\bbearer\s+\S{8,}", re.IGNORECASE)


def _random_looking(run: str) -> bool:
    """Mixed case throughout, as random base64 is (43 characters of ``token_urlsafe(32)`` have
    ~17 of each case); hex ids and words with a capital or two are not."""
    return sum(c.isupper() for c in run) >= 4 and sum(c.islower() for c in run) >= 4


def _decodings(text: str) -> list[str]:
    """``text`` and its percent-decodings (a secret may arrive encoded once or twice)."""
    out = [text]
    for _ in range(3):
        nxt = unquote_plus(out[-1])
        if nxt == out[-1]:
            break
        out.append(nxt)
    return out


def looks_secret(text: str, known: Iterable[str] = ()) -> bool:
    """Whether ``text`` (a path segment, a query name or value) looks like it holds a secret;
    ``known`` are secrets to find verbatim (the admin token)."""
    known = [k for k in known if k]
    for t in _decodings(text):
        if any(k in t for k in known) or _TENANT_KEY.search(t) or _BEARER.search(t):
            return True
        if any(_random_looking(run) for run in _LONG_RUN.findall(t)):
            return True
    return False


def secret_query_name(name: str) -> bool:
    n = unquote_plus(name).strip().lower().replace("-", "_")
    return n in SECRET_QUERY_NAMES or n.endswith(_SECRET_NAME_SUFFIXES)


def redact_target(path: str, query: str = "", known: Iterable[str] = ()) -> str:
    """The request target (``path`` as sent, percent-encoded, and the raw query string) with
    every secrets-shaped part replaced by ``[redacted]``; query names are kept (unless they look
    like a secret themselves), so is everything else. At most :data:`MAX_TARGET_CHARS`."""
    known = [k for k in known if k]
    segments = [REDACTED if looks_secret(seg, known) else seg for seg in path.split("/")]
    out = "/".join(segments)
    if query:
        parts = []
        for part in query.split("&"):
            name, eq, value = part.partition("=")
            if looks_secret(name, known):
                parts.append(REDACTED)
            elif eq and (secret_query_name(name) or looks_secret(value, known)):
                parts.append(f"{name}={REDACTED}")
            else:
                parts.append(part)
        out += "?" + "&".join(parts)
    # a known secret split across segments or parameters (it may hold '/' or '&')
    if any(k in unquote(out) for k in known):
        out = REDACTED
    if len(out) > MAX_TARGET_CHARS:
        out = out[:MAX_TARGET_CHARS] + "...(truncated)"
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, then the
    record's structured ``fields`` or its ``message``; ``exc`` holds a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


class ExplainedStartupFailure(logging.Filter):
    """uvicorn logs the traceback of a failed start-up as one record (``uvicorn.error``). For
    the errors the service has already logged as one line saying what to do (``explained``:
    qualified class names, e.g. a face artefact without the faces extra), that traceback adds
    nothing for an operator: its record becomes one line naming the error."""

    def __init__(self, explained: Iterable[type[BaseException]]) -> None:
        super().__init__()
        self.explained = {f"{c.__module__}.{c.__qualname__}" for c in explained}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.error" and isinstance(record.msg, str):
            text = record.msg.rstrip()
            if text.startswith("Traceback (most recent call last)"):
                name = text.splitlines()[-1].split(":", 1)[0]
                if name in self.explained:
                    record.msg = f"start-up refused: {name.rsplit('.', 1)[-1]} (logged above)"
                    record.args = ()
        return True
