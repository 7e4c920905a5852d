"""Find credential values where they must never be: status, Events, log lines (issue 15, "no credential value
appears in any status, Event or log line"). Pure: callers collect the values and the texts.

Values shorter than MIN_LENGTH are not scanned: "admin" or "true" would match innocent text. Access key ids,
user names, endpoints and regions are identifiers, not secrets (S3 errors and ARNs carry key ids), so Secret keys
named like them are skipped. A value with several lines is scanned line by line: botocore copies a value cut at
its newline, and each part is still the secret.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass

MIN_LENGTH = 8
# Secret keys whose values are identifiers or addresses, not secrets.
_NOT_SECRET_KEY = re.compile(r"(^|[_.-])(id|user|username|endpoint|url|region|bucket|namespace)$", re.IGNORECASE)


@dataclass(frozen=True)
class Finding:
    where: str  # e.g. 'FineTuneJob t1-a/support status', 'Event t1-a/support.1a2b', '/tmp/.../operator.log:12'
    source: str  # where the value came from (e.g. 'Secret t1-a/store key AWS_SECRET_ACCESS_KEY'), never the value

    def __str__(self) -> str:
        return f"{self.where}: the value of {self.source}"


def fragments(value: str) -> list[str]:
    """The parts of `value` worth scanning for: each line of at least MIN_LENGTH characters, stripped."""
    return [line.strip() for line in value.splitlines() if len(line.strip()) >= MIN_LENGTH]


def secret_values(secret: Mapping[str, object]) -> dict[str, str]:
    """'Secret ns/name key K' -> value, for each scannable value of a Secret (as a dict from the API server)."""
    meta = secret.get("metadata") or {}
    assert isinstance(meta, Mapping)
    label = f"Secret {meta.get('namespace')}/{meta.get('name')}"
    out: dict[str, str] = {}
    for field, decode in (("data", True), ("stringData", False)):
        items = secret.get(field) or {}
        assert isinstance(items, Mapping)
        for key, raw in items.items():
            if _NOT_SECRET_KEY.search(str(key)) or not isinstance(raw, str):
                continue
            try:
                value = base64.b64decode(raw, validate=True).decode() if decode else raw
            except (binascii.Error, UnicodeDecodeError):
                continue  # binary: no text to find
            if fragments(value):
                out[f"{label} key {key}"] = value
    return out


class Scanner:
    """Credential values (by where they came from) and what was found so far."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.findings: dict[Finding, None] = {}  # ordered, deduplicated

    def add(self, source: str, value: str | None) -> None:
        if value and fragments(value):
            self.values.setdefault(source, value)

    def scan(self, where: str, text: str) -> list[Finding]:
        """Record (and return) each value that appears in `text`."""
        found = [
            Finding(where, source)
            for source, value in self.values.items()
            if any(fragment in text for fragment in fragments(value))
        ]
        for f in found:
            self.findings.setdefault(f, None)
        return found

    def scan_lines(self, where: str, text: str) -> list[Finding]:
        """Like scan, for a log: one finding per line that holds a value (`where:<line number>`)."""
        if not self.scan_quiet(text):
            return []
        found: list[Finding] = []
        for number, line in enumerate(text.splitlines(), 1):
            found += self.scan(f"{where}:{number}", line)
        return found

    def scan_quiet(self, text: str) -> bool:
        """Whether any value appears in `text` (nothing recorded)."""
        return any(fragment in text for value in self.values.values() for fragment in fragments(value))

    def report(self) -> str:
        return "\n".join(str(f) for f in self.findings)
