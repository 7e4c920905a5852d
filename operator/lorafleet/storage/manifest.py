"""The manifest of an artifact version and its digest.

A version is identified by the digest of its manifest: ``sha256:<hex>`` of the manifest's *canonical bytes*,
which are exactly the bytes stored as ``manifest.json``::

    json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()

where ``manifest`` is the camelCase JSON object with absent optional fields left out (not ``null``). So
``sha256sum manifest.json`` prints the digest, and any language can recompute it from the parsed object.
The manifest lists every file with its sha256 and size, so the digest pins every byte of the version. A file
larger than ``blockSize`` also lists the sha256 of each block (``blocks``): a pull fetches blocks in parallel and
checks each one as it streams in, so verification runs in parallel with the download instead of after it (sha256
itself cannot be parallelised), and a resumed pull re-checks only the blocks it kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

ArtifactKind = Literal["adapter", "model"]
MANIFEST_NAME = "manifest.json"
# A manifest lists every file of a version with its sha256: a few KiB, a few MiB for a model of thousands of files.
# Anything larger is refused before parsing, so a hostile store cannot make a reader hold or parse gigabytes.
MAX_MANIFEST_BYTES = 4 << 20
SCHEMA_VERSION = 1

_HEX64 = r"^[a-f0-9]{64}$"
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
# Upload ids sort by time and carry their creation time, so gc can age them without extra requests.
UPLOAD_ID = re.compile(r"^\d{8}T\d{6}Z-[a-f0-9]{12}$")
DATA_DIR = "data"
RESERVED_DIR = ".lorafleet"  # bookkeeping inside a pulled folder; never part of an artifact


class _Model(BaseModel):
    # Unknown fields are kept (a newer writer may add some); the digest is over the stored bytes anyway.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


DEFAULT_BLOCK_SIZE = 16 * 1024 * 1024


class FileEntry(_Model):
    path: str = Field(description="POSIX path relative to the version folder.")
    sha256: str = Field(pattern=_HEX64)
    size: int = Field(ge=0)
    blocks: list[Annotated[str, Field(pattern=_HEX64)]] | None = Field(
        default=None, description="sha256 of each blockSize slice; only for files larger than one block."
    )

    @field_validator("path")
    @classmethod
    def _safe_path(cls, v: str) -> str:
        check_relative_path(v)
        return v


class BaseModelRef(_Model):
    name: str
    uri: str | None = None
    digest: str | None = Field(default=None, pattern=_DIGEST.pattern)


class DatasetRef(_Model):
    uri: str
    sha256: str | None = Field(default=None, pattern=_HEX64)
    etag: str | None = None
    version_id: str | None = None


class Manifest(_Model):
    schema_version: int = SCHEMA_VERSION
    kind: ArtifactKind
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    data_prefix: str = Field(description="Where the file bytes are, relative to the version folder.")
    files: list[FileEntry]
    total_size: int = Field(ge=0)
    block_size: int = Field(default=DEFAULT_BLOCK_SIZE, ge=1024 * 1024, description="Size of the hashed blocks.")
    base_model: BaseModelRef | None = None
    dataset: DatasetRef | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    trainer_image: str | None = None
    # The task evaluation of an adapter (lorafleet.contracts.evaluation.EvaluationResult, key EVALUATION_KEY).
    evaluation: dict[str, Any] | None = None
    lorafleet_version: str
    created_at: str = Field(description="UTC, RFC 3339, seconds precision.")

    @field_validator("data_prefix")
    @classmethod
    def _data_prefix(cls, v: str) -> str:
        head, _, upload_id = v.partition("/")
        if head != DATA_DIR or not UPLOAD_ID.match(upload_id):
            raise ValueError(f"dataPrefix {v!r} is not data/<upload-id>")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        paths = [f.path for f in self.files]
        if paths != sorted(set(paths)):
            raise ValueError("files must be sorted by path and unique")
        if self.total_size != sum(f.size for f in self.files):
            raise ValueError(f"totalSize {self.total_size} is not the sum of the file sizes")
        for f in self.files:
            n = block_count(f.size, self.block_size)
            if (f.blocks is None and n > 1) or (f.blocks is not None and (n <= 1 or len(f.blocks) != n)):
                raise ValueError(f"{f.path}: {n} blocks of {self.block_size} bytes, blocks lists {len(f.blocks or [])}")
        _check_finite(self.metrics, "metrics")
        _check_finite(self.hyperparameters, "hyperparameters")
        _check_finite(self.evaluation, "evaluation")
        return self

    def to_json_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = self.model_dump(by_alias=True, mode="json", exclude_none=True)
        return obj

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_json_obj())

    @property
    def digest(self) -> str:
        return digest_of(self.canonical_bytes())

    def identity(self) -> dict[str, Any]:
        """What makes two uploads "the same version": everything but when, by which writer, and where staged."""
        obj = self.to_json_obj()
        # Block hashes are derived from the files (and depend on the writer's blockSize): not identity.
        for key in ("createdAt", "dataPrefix", "lorafleetVersion", "blockSize"):
            obj.pop(key, None)
        for f in obj["files"]:
            f.pop("blocks", None)
        return obj

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)


def block_count(size: int, block_size: int) -> int:
    return (size + block_size - 1) // block_size


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    if not _DIGEST.match(digest):
        raise ValueError(f"digest {digest!r} is not sha256:<64 lowercase hex digits>")
    return digest


def parse_manifest(raw: bytes) -> tuple[Manifest, str]:
    """The manifest and its digest (over the stored bytes, whoever wrote them)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ValueError(f"it is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} bytes a manifest may have")
    return Manifest.model_validate_json(raw), digest_of(raw)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_relative_path(path: str) -> None:
    """Refuse paths that could escape the destination folder or collide with our bookkeeping."""
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or any(p in ("", ".", "..") for p in parts)
        or parts[0] == RESERVED_DIR
    ):
        raise ValueError(f"unsafe file path {path!r}: must be relative, without '.', '..' or empty segments")


def _check_finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} holds a non-finite number ({value}): JSON cannot carry it")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, f"{where}[{i}]")
