"""Where things are in the bucket.

    s3://<bucket>/<prefix>/adapters/<name>/<version>/manifest.json          the commit point of the version
    s3://<bucket>/<prefix>/adapters/<name>/<version>/data/<upload-id>/...   its files, as the manifest lists them
    s3://<bucket>/<prefix>/models/<name>/<revision>/...                     base models, the same way

Each writer puts its files under its own ``data/<upload-id>/`` and then creates ``manifest.json`` with a
conditional PUT (If-None-Match: *): see docs/storage.md. Any folder holding a manifest.json is a version, so a
base model may also live outside this layout (``s3://models/meta-llama/Llama-3.1-8B-Instruct/main``).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from lorafleet.storage.manifest import DATA_DIR, MANIFEST_NAME, UPLOAD_ID, ArtifactKind
from lorafleet.uris import parse

KIND_DIRS: dict[ArtifactKind, str] = {"adapter": "adapters", "model": "models"}
_SEGMENT = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Location:
    """A bucket and a key prefix (no leading or trailing slash; empty for the bucket root)."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, uri: str) -> Location:
        loc = parse(uri)
        if loc.scheme != "s3":
            raise ValueError(f"{uri!r} is not an s3:// URI")
        return cls(loc.authority, loc.path)

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    def child(self, *parts: str) -> Location:
        return Location(self.bucket, self.key(*parts))

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class VersionFolder:
    """The folder of one version: `manifest.json` plus `data/<upload-id>/`."""

    location: Location

    @classmethod
    def parse(cls, uri: str) -> VersionFolder:
        loc = Location.parse(uri)
        if not loc.prefix:
            raise ValueError(f"{uri!r} is a bucket, not a version folder (s3://bucket/.../<name>/<version>)")
        return cls(loc)

    @property
    def bucket(self) -> str:
        return self.location.bucket

    @property
    def uri(self) -> str:
        return self.location.uri

    @property
    def manifest_key(self) -> str:
        return self.location.key(MANIFEST_NAME)

    @property
    def data_root(self) -> str:
        """Key prefix (with trailing slash) under which every upload stages its files."""
        return self.location.key(DATA_DIR) + "/"

    def data_key(self, data_prefix: str, path: str) -> str:
        return self.location.key(data_prefix, path)

    def __str__(self) -> str:
        return self.uri


def version_folder(root: str | Location, kind: ArtifactKind, name: str, version: str) -> VersionFolder:
    """`<root>/adapters/<name>/<version>` (or models/...); names are checked so keys stay predictable."""
    loc = Location.parse(root) if isinstance(root, str) else root
    name_parts = name.split("/")
    if kind == "adapter" and len(name_parts) != 1:
        raise ValueError(f"adapter name {name!r} must not contain '/'")
    for part in (*name_parts, version):
        if not _SEGMENT.match(part):
            raise ValueError(f"{part!r} is not a valid name or version: use letters, digits, '.', '_' and '-'")
    return VersionFolder(loc.child(KIND_DIRS[kind], name, version))


@dataclass(frozen=True)
class LayoutInfo:
    root: Location
    kind: ArtifactKind
    name: str
    version: str


def infer_layout(folder: VersionFolder) -> LayoutInfo | None:
    """kind/name/version from a folder in the standard layout, or None for a folder outside it."""
    segs = folder.location.prefix.split("/")
    if len(segs) >= 3 and segs[-3] == "adapters":
        return LayoutInfo(Location(folder.bucket, "/".join(segs[:-3])), "adapter", segs[-2], segs[-1])
    # Model names may hold a slash (org/name): take the first "models" with at least name and revision after it.
    for i, seg in enumerate(segs[:-2]):
        if seg == "models":
            return LayoutInfo(
                Location(folder.bucket, "/".join(segs[:i])), "model", "/".join(segs[i + 1 : -1]), segs[-1]
            )
    return None


def new_upload_id(now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(6)}"


def upload_time(upload_id: str) -> datetime | None:
    if not UPLOAD_ID.match(upload_id):
        return None
    return datetime.strptime(upload_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
