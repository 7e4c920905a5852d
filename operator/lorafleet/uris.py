"""Parsing of the URIs used in specs: s3://bucket/key, pvc://claim/path, hf://org/name@revision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scheme = Literal["s3", "pvc", "hf"]


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
    return Location(scheme, authority, path.strip("/"))  # type: ignore[arg-type]
