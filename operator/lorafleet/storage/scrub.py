"""Removing credentials from text before it reaches a status condition, an Event or a log line.

botocore and http.client copy header values into their messages (an access key or session token with a newline
in it comes back as "Invalid header value b'...'"), and presigned URLs carry `Signature=`/`X-Amz-Credential=`.
Every process that builds a store client `remember`s its credential values; `scrub` then removes them (raw, as
Python's repr escapes them, and each line of a multi-line value) and anything shaped like an S3 signing field.

An access key id is an identifier (stores print it in their own errors), and a short one such as MinIO's user
name "lorafleet" also names buckets and objects: it is removed everywhere only when it could not be a key id
(several lines, control characters: a secret read through a tenant-chosen key name) or is long enough not to
collide with words (16+ characters, as AWS ids); otherwise only inside the signing fields.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

REDACTED = "[REDACTED]"
# Lines shorter than this are not removed on their own (a value "a\nb" must not blank every "a"); the whole
# value always is.
MIN_FRAGMENT = 4
_MAX_REMEMBERED = 256

# Query parameters and header fields of S3 signing (SigV2 and SigV4, presigned or not).
_FIELDS = re.compile(
    r"(?i)\b(AWSAccessKeyId|Signature|X-Amz-Credential|X-Amz-Signature|X-Amz-Security-Token|Credential|"
    r"aws_access_key_id|aws_secret_access_key|aws_session_token)(\s*[=:]\s*)[^\s&,;'\"]+"
)

_lock = threading.Lock()
_remembered: OrderedDict[str, None] = OrderedDict()


def secret_key_id(key_id: str | None) -> str | None:
    """The access key id, when it must be treated as a secret (see the module's docstring)."""
    if not key_id:
        return None
    plausible = key_id.isprintable() and len(key_id) < 16
    return None if plausible else key_id


def remember(*values: str | None, key_id: str | None = None) -> None:
    """Credential values this process holds: `scrub` removes them from every message from now on."""
    with _lock:
        for value in (*values, secret_key_id(key_id)):
            if value:
                _remembered[value] = None
                _remembered.move_to_end(value)
        while len(_remembered) > _MAX_REMEMBERED:
            _remembered.popitem(last=False)


def _forms(value: str) -> list[str]:
    forms = {value, repr(value)[1:-1], repr(value.encode(errors="replace"))[2:-1]}
    for line in value.splitlines():
        if len(line.strip()) >= MIN_FRAGMENT:
            forms.add(line.strip())
    # Longest first: a whole value goes before the lines it contains.
    return sorted((f for f in forms if f), key=len, reverse=True)


def scrub(text: str, extra: Iterable[str | None] = ()) -> str:
    """`text` without the remembered credentials, `extra` ones, and S3 signing fields."""
    with _lock:
        values = [*_remembered]
    values.extend(v for v in extra if v)
    for value in values:
        for form in _forms(value):
            if form in text:
                text = text.replace(form, REDACTED)
    return _FIELDS.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


class ScrubFilter(logging.Filter):
    """A logging filter that renders each record's message once, scrubbed (tracebacks included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is logging's problem, not ours
            return True
        record.msg, record.args = scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            # Formatters (text and JSON) use exc_text when exc_info is gone.
            record.exc_text, record.exc_info = scrub(record.exc_text), None
        return True


def install_log_filter(logger: logging.Logger | None = None) -> None:
    """Scrub every record that reaches the root logger's handlers (and `logger`'s, if given)."""
    targets = [logging.getLogger()] + ([logger] if logger is not None else [])
    for target in targets:
        for handler in target.handlers:
            if not any(isinstance(f, ScrubFilter) for f in handler.filters):
                handler.addFilter(ScrubFilter())


def scrub_tree(value: Any) -> Any:
    """A JSON-like value (a status) with every string scrubbed; unchanged values are returned as they are."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: scrub_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_tree(v) for v in value]
    return value
