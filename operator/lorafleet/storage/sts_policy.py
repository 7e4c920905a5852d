"""The pure half of STS credentials (storage.sts mints them): what a workload may reach and the session policy
that says so, and the keys of the Secret the operator writes. No I/O: the planners (resources) use it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lorafleet.storage.errors import StoreError
from lorafleet.uris import parse

# The keys of the Secret a workload reads (the names boto3 reads from the environment).
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

_OBJECT_WRITE = [
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
]


@dataclass(frozen=True)
class Grant:
    """What one workload may reach: read-write prefixes and read-only ones, as s3:// URIs."""

    read_write: tuple[str, ...]
    read_only: tuple[str, ...] = ()


def bucket_key(uri: str) -> tuple[str, str]:
    location = parse(uri)
    if location.scheme != "s3":
        raise StoreError(f"{uri} is not an s3:// URI: only s3:// locations can be granted")
    return location.authority, location.path.strip("/")


def _statements(uris: Iterable[str], actions: list[str], sid: str) -> list[dict[str, Any]]:
    """Object actions on `<bucket>/<key>/*` (and the key itself: a single object such as a dataset file), and
    ListBucket limited by s3:prefix to the same keys."""
    objects: list[str] = []
    prefixes: dict[str, list[str]] = {}
    for uri in uris:
        bucket, key = bucket_key(uri)
        objects += (
            [f"arn:aws:s3:::{bucket}/{key}/*", f"arn:aws:s3:::{bucket}/{key}"] if key else [f"arn:aws:s3:::{bucket}/*"]
        )
        prefixes.setdefault(bucket, []).extend([f"{key}/*", key] if key else ["*"])
    if not objects:
        return []
    statements: list[dict[str, Any]] = [
        {"Sid": f"{sid}Objects", "Effect": "Allow", "Action": actions, "Resource": sorted(set(objects))}
    ]
    for i, (bucket, keys) in enumerate(sorted(prefixes.items())):
        statements.append(
            {
                "Sid": f"{sid}List{i}",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{bucket}"],
                "Condition": {"StringLike": {"s3:prefix": sorted(set(keys))}},
            }
        )
    return statements


def session_policy(grant: Grant) -> dict[str, Any]:
    """The inline session policy for `grant` (pure). Listing unfinished multipart uploads is bucket-wide (MinIO
    lists them only without a prefix; lorafleet filters them itself, storage.objects.abort_multipart): it shows
    the keys of uploads in progress, never their content, and aborting one needs the object rights above."""
    statements = _statements(grant.read_write, _OBJECT_WRITE, "ReadWrite")
    statements += _statements(grant.read_only, ["s3:GetObject"], "ReadOnly")
    buckets = sorted({bucket_key(u)[0] for u in grant.read_write})
    if buckets:
        statements.append(
            {
                "Sid": "Uploads",
                "Effect": "Allow",
                "Action": ["s3:ListBucketMultipartUploads"],
                "Resource": [f"arn:aws:s3:::{b}" for b in buckets],
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


def session_name(namespace: str, name: str) -> str:
    """RoleSessionName: 2-64 characters of [\\w+=,.@-], shown in the store's audit log."""
    raw = f"lorafleet.{namespace}.{name}"
    cleaned = "".join(c if c.isalnum() or c in "+=,.@-_" else "-" for c in raw)
    return cleaned[:64]
