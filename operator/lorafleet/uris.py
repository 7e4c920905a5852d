"""Parsing of the URIs used in specs: s3://bucket/key, pvc://claim/path, hf://org/name@revision."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Scheme = Literal["s3", "pvc", "hf"]

# Percent-encoded '.', '/' and '\\': nothing here decodes them, but a tool further down might, so refuse them.
_ENCODED = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


def pvc_subpath(path: str, uri: str = "") -> str:
    """The path after ``pvc://claim/``, normalised (one trailing slash dropped); ValueError when it could leave
    the claim or mean two things: '.', '..' or empty segments (so no absolute path), backslashes,
    percent-encoded dots or slashes, control characters. The CRDs check the same (api.common.PVC_PATH_RULE)."""
    where = repr(uri or path)
    if "\\" in path or _ENCODED.search(path) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise ValueError(
            f"{where}: a pvc:// path may not hold backslashes, control characters or %2e/%2f/%5c; "
            "write the plain path inside the claim, e.g. pvc://claim/data/train.jsonl"
        )
    segments = path.split("/") if path else []
    if len(segments) > 1 and segments[-1] == "":
        segments.pop()  # one trailing slash: a folder
    if any(s in ("", ".", "..") for s in segments):
        raise ValueError(
            f"{where}: a pvc:// path may not hold '.', '..' or empty segments (it must stay inside its claim); "
            "write the plain path inside the claim, e.g. pvc://claim/data/train.jsonl"
        )
    return "/".join(segments)


@dataclass(frozen=True)
class Location:
    scheme: Scheme
    authority: str  # bucket, claim name, or hub org/name
    path: str  # key prefix or path inside the volume, without leading or trailing slash
    revision: str | None = None  # hf only

    def join(self, *parts: str) -> str:
        """A child location as a URI string."""
        path = "/".join(p.strip("/") for p in (self.path, *parts) if p.strip("/"))
        return f"{self.scheme}://{self.authority}/{path}" if path else f"{self.scheme}://{self.authority}"

    def __str__(self) -> str:
        return self.join()


def parse(uri: str) -> Location:
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in ("s3", "pvc", "hf"):
        raise ValueError(f"unsupported URI {uri!r}: expected s3://, pvc:// or hf://")
    if scheme == "hf":
        name, _, revision = rest.partition("@")
        return Location("hf", name.strip("/"), "", revision or None)
    authority, _, path = rest.partition("/")
    if not authority:
        raise ValueError(f"URI {uri!r} has no bucket or claim name")
    if scheme == "pvc":
        return Location("pvc", authority, pvc_subpath(path, uri))
    return Location(scheme, authority, path.strip("/"))  # type: ignore[arg-type]
