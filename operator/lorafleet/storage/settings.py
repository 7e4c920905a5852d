"""How to reach the store: from the environment the operator renders into pods, or from an ObjectStore spec.

Environment (the names `lorafleet.resources.common.store_env` and `ca_bundle_volume` render):

| variable | meaning |
|---|---|
| `LORAFLEET_STORE_ENDPOINT` | S3 endpoint URL; unset means AWS S3 |
| `LORAFLEET_STORE_REGION` | region (default us-east-1) |
| `LORAFLEET_STORE_INSECURE_SKIP_TLS_VERIFY` | `true` skips TLS verification (`false`/unset: verify; else: error) |
| `LORAFLEET_STORE_SSE` | `AES256` or `aws:kms`: server-side encryption requested on upload |
| `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` | credentials (else boto3's default chain) |
| `LORAFLEET_STORE_ANONYMOUS` | `true`: unsigned requests, never boto3's default chain (a store that names no Secret) |
| `LORAFLEET_STORE_CREDENTIALS_DIR` | a mounted Secret with files `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` |
| `AWS_CA_BUNDLE` | PEM bundle to verify the endpoint's certificate |
| `LORAFLEET_STORE_MAX_ATTEMPTS` | attempts per request, botocore "standard" retry mode (default 5) |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lorafleet.storage.errors import StoreError

if TYPE_CHECKING:
    from lorafleet.api.common import ObjectStore

SSE = Literal["AES256", "aws:kms"]
MiB = 1024 * 1024

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    # A typo must not silently turn verification on or off.
    raise StoreError(f"{name}={env[name]!r} is not a boolean: use true or false")


@dataclass(frozen=True)
class TransferSettings:
    """Sizes and parallelism of transfers. Defaults suit a LAN-attached MinIO/Ceph."""

    multipart_threshold: int = 16 * MiB
    multipart_chunksize: int = 16 * MiB
    max_concurrency: int = 8  # parallel part uploads/ranged GETs per store
    # Written into the manifest at push (each block's sha256 is listed); a pull fetches, verifies and resumes
    # in units of the manifest's block size, whatever its own setting.
    block_size: int = 16 * MiB


@dataclass(frozen=True)
class StoreSettings:
    endpoint: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None
    insecure_skip_tls_verify: bool = False
    sse: SSE | None = None
    max_attempts: int = 5
    # Send each body's sha256 as x-amz-checksum-sha256 (AWS, MinIO, Ceph RGW since Reef). false: for stores that
    # reject S3 checksum headers; botocore then signs the payload hash as usual (one more pass over the bytes).
    checksum_headers: bool = True
    # Unsigned requests: a store that names no credentials must not get the process's own (boto3's default
    # chain: environment, instance or workload identity); only the platform's default store may use them.
    anonymous: bool = False
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    transfer: TransferSettings = field(default_factory=TransferSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StoreSettings:
        env = os.environ if env is None else env
        access, secret = env.get("AWS_ACCESS_KEY_ID") or None, env.get("AWS_SECRET_ACCESS_KEY") or None
        creds_dir = env.get("LORAFLEET_STORE_CREDENTIALS_DIR")
        if creds_dir and not (access and secret):
            access, secret = _read_credentials_dir(Path(creds_dir))
        sse = env.get("LORAFLEET_STORE_SSE") or None
        if sse not in (None, "AES256", "aws:kms"):
            raise StoreError(f"LORAFLEET_STORE_SSE={sse!r} is not supported: use AES256 or aws:kms, or leave it unset")
        attempts = env.get("LORAFLEET_STORE_MAX_ATTEMPTS", "5")
        if not attempts.isdigit() or int(attempts) < 1:
            raise StoreError(f"LORAFLEET_STORE_MAX_ATTEMPTS={attempts!r} must be a positive integer")
        return cls(
            endpoint=env.get("LORAFLEET_STORE_ENDPOINT") or None,
            region=env.get("LORAFLEET_STORE_REGION") or "us-east-1",
            access_key_id=access,
            secret_access_key=secret,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            ca_bundle=env.get("AWS_CA_BUNDLE") or None,
            insecure_skip_tls_verify=_flag(env, "LORAFLEET_STORE_INSECURE_SKIP_TLS_VERIFY"),
            sse=sse,  # type: ignore[arg-type]
            max_attempts=int(attempts),
            checksum_headers=_flag(env, "LORAFLEET_STORE_CHECKSUM_HEADERS", default=True),
            anonymous=_flag(env, "LORAFLEET_STORE_ANONYMOUS"),
        )

    @classmethod
    def from_object_store(
        cls,
        store: ObjectStore,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        ca_bundle: str | None = None,
    ) -> StoreSettings:
        """Settings for a spec's ObjectStore; the caller resolves its Secrets (the spec only references them).
        Without credentials the requests go unsigned: never with the caller's own."""
        return cls(
            endpoint=store.endpoint.rstrip("/"),
            region=store.region,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            ca_bundle=ca_bundle,
            insecure_skip_tls_verify=store.insecure_skip_tls_verify,
            sse=store.server_side_encryption,
            checksum_headers=store.checksum_headers,
            anonymous=access_key_id is None,
        )

    def with_transfer(self, **changes: int) -> StoreSettings:
        return replace(self, transfer=replace(self.transfer, **changes))

    @property
    def verify(self) -> bool | str:
        """botocore's `verify`: False only when asked for explicitly; a CA bundle path when given."""
        if self.insecure_skip_tls_verify:
            return False
        if self.ca_bundle:
            if not Path(self.ca_bundle).is_file():
                raise StoreError(f"CA bundle {self.ca_bundle} does not exist: fix AWS_CA_BUNDLE or the mounted Secret")
            return self.ca_bundle
        return True

    def describe(self) -> str:
        return self.endpoint or f"AWS S3 ({self.region})"


def _read_credentials_dir(path: Path) -> tuple[str, str]:
    try:
        access = (path / "AWS_ACCESS_KEY_ID").read_text().strip()
        secret = (path / "AWS_SECRET_ACCESS_KEY").read_text().strip()
    except OSError as e:
        raise StoreError(
            f"cannot read credentials from {path}: {e}; mount a Secret with keys AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY there, or unset LORAFLEET_STORE_CREDENTIALS_DIR"
        ) from e
    return access, secret
