"""Errors of the artifact store. Every message names the bucket or key involved and what to do about it."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every artifact-store error."""


class StoreUnavailable(StoreError):
    """The endpoint could not be reached (after retries), or the connection kept failing mid-transfer."""


class BadCredentials(StoreError):
    """The store refused the credentials: unknown key, wrong secret, expired token, or none found."""


class AccessDenied(BadCredentials):
    """The credentials are valid but lack a permission on this bucket or key."""


class BucketNotFound(StoreError):
    """The bucket does not exist."""


class ObjectNotFound(StoreError):
    """The key does not exist (for a version folder: no manifest.json there)."""


class ChecksumMismatch(StoreError):
    """Bytes read back do not match the sha256 (or size) recorded in the manifest, or a pinned digest."""


class VersionExists(StoreError):
    """The version already exists with different content (or another writer committed it first)."""


class IncompleteVersion(StoreError):
    """The version folder has data but no manifest: an upload was interrupted or is still running."""


class ConditionalWritesUnsupported(StoreError):
    """The server ignores If-None-Match on PUT, so concurrent writers cannot be told apart safely."""


class ObjectTooLarge(StoreError):
    """An object read whole (a manifest) is larger than the cap for its kind: refused before it is read."""
