"""The artifact store: immutable, checksummed adapter and model versions in any S3-compatible store.

See docs/storage.md for the layout, the manifest and its digest, and the write protocol.
"""

from lorafleet.storage.errors import (
    AccessDenied,
    BadCredentials,
    BucketNotFound,
    ChecksumMismatch,
    IncompleteVersion,
    ObjectNotFound,
    ObjectTooLarge,
    StoreError,
    StoreUnavailable,
    VersionExists,
)
from lorafleet.storage.layout import Location, VersionFolder, infer_layout, version_folder
from lorafleet.storage.manifest import BaseModelRef, DatasetRef, FileEntry, Manifest, canonical_json, digest_of
from lorafleet.storage.settings import StoreSettings, TransferSettings
from lorafleet.storage.store import ArtifactStore, PullResult, PushResult, VersionInfo

__all__ = [
    "AccessDenied",
    "ArtifactStore",
    "BadCredentials",
    "BaseModelRef",
    "BucketNotFound",
    "ChecksumMismatch",
    "DatasetRef",
    "FileEntry",
    "IncompleteVersion",
    "Location",
    "Manifest",
    "ObjectNotFound",
    "ObjectTooLarge",
    "PullResult",
    "PushResult",
    "StoreError",
    "StoreSettings",
    "StoreUnavailable",
    "TransferSettings",
    "VersionExists",
    "VersionFolder",
    "VersionInfo",
    "canonical_json",
    "digest_of",
    "infer_layout",
    "version_folder",
]
