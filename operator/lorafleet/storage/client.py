"""The boto3 client for the store, and the mapping of botocore errors to lorafleet's."""

from __future__ import annotations

from typing import Any

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    SSLError,
)
from botocore.handlers import add_expect_header

from lorafleet.io_metrics import count_botocore_sends
from lorafleet.storage.errors import (
    AccessDenied,
    BadCredentials,
    BucketNotFound,
    ObjectNotFound,
    StoreError,
    StoreUnavailable,
)
from lorafleet.storage.scrub import remember, scrub, secret_key_id
from lorafleet.storage.settings import StoreSettings

_BAD_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
}
_NOT_FOUND = {"NoSuchKey", "NotFound", "404", "NoSuchVersion"}
PRECONDITION_FAILED = {"PreconditionFailed", "412"}
CONDITIONAL_CONFLICT = {"ConditionalRequestConflict", "409"}


def make_client(settings: StoreSettings, *, verified_bodies: bool = False) -> Any:
    """An S3 client: path-style (MinIO, Ceph RGW and on-prem DNS need it), standard retries with backoff.

    verified_bodies: for requests whose bodies the caller checksums itself (a sha256 sent as
    x-amz-checksum-sha256, which is signed and checked by the server; downloads checked against the manifest):
    no SigV4 payload hash and no default CRC32 on top, which would be a second and third pass over every byte.
    """
    try:
        from lorafleet import __version__ as version
    except ImportError:  # pragma: no cover - the package always defines it
        version = "unknown"
    remember(settings.secret_access_key, settings.session_token, key_id=settings.access_key_id)
    own_checksums = verified_bodies and settings.checksum_headers
    config = Config(
        region_name=settings.region,
        signature_version=UNSIGNED if settings.anonymous else "s3v4",
        s3={"addressing_style": "path", **({"payload_signing_enabled": False} if own_checksums else {})},
        request_checksum_calculation="when_required" if verified_bodies else "when_supported",
        response_checksum_validation="when_required" if verified_bodies else "when_supported",
        # "standard" retries throttling, 5xx and connection errors with exponential backoff and jitter.
        retries={"mode": "standard", "max_attempts": settings.max_attempts},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        # One pooled connection per concurrent ranged GET / part upload, plus a few for metadata calls.
        max_pool_connections=max(10, settings.transfer.max_concurrency * 2 + 4),
        user_agent_extra=f"lorafleet/{version}",
    )
    if settings.anonymous:  # no credentials at all, so boto3 never looks up its default chain
        session = boto3.session.Session(region_name=settings.region)
    else:
        session = boto3.session.Session(
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            aws_session_token=settings.session_token,
            region_name=settings.region,
        )
    client = session.client("s3", endpoint_url=settings.endpoint, verify=settings.verify, config=config)
    # botocore sends uploads with "Expect: 100-continue" and waits only 1 s for the 100: a busy server answering
    # later desynchronises the response parsing (seen with MinIO under load: "Failed to parse headers", then
    # KeyError 'ETag' in s3transfer). The header only saves a rejected body's bandwidth; send bodies directly.
    client.meta.events.unregister("before-call.s3", add_expect_header)
    count_botocore_sends(client, "s3")
    return client


def error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def http_status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def is_precondition_failed(e: Exception) -> bool:
    """412: the object exists, a conditional create lost."""
    return isinstance(e, ClientError) and (error_code(e) in PRECONDITION_FAILED or http_status(e) == 412)


def is_conditional_conflict(e: Exception) -> bool:
    """409: AWS answers this while another conditional write of the key is in flight; retry, then it is 412 or 200."""
    return isinstance(e, ClientError) and (error_code(e) in CONDITIONAL_CONFLICT or http_status(e) == 409)


def translate(e: Exception, settings: StoreSettings, bucket: str, key: str | None, action: str) -> StoreError:
    """A lorafleet error for a botocore one, naming what was being done, on which object, and the fix; its
    message scrubbed of the credentials in use (botocore copies header values into its own messages)."""
    if isinstance(e, StoreError):
        return e
    error = _translate(e, settings, bucket, key, action)
    message = str(error)
    clean = scrub(message, (secret_key_id(settings.access_key_id), settings.secret_access_key, settings.session_token))
    if clean != message:
        error = type(error)(clean)
    return error


def _translate(e: Exception, settings: StoreSettings, bucket: str, key: str | None, action: str) -> StoreError:
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    endpoint = settings.describe()
    if isinstance(e, ClientError):
        code, message = error_code(e), e.response.get("Error", {}).get("Message", "")
        if code == "NoSuchBucket":
            return BucketNotFound(
                f"bucket {bucket!r} does not exist at {endpoint} (while trying to {action} {where}): create it, "
                "or fix the bucket in the URI"
            )
        if code in _BAD_CREDENTIALS:
            return BadCredentials(
                f"{endpoint} refused the credentials ({code}) while trying to {action} {where}: check "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the store's credentialsSecretRef)"
            )
        if code in ("AccessDenied", "403", "Forbidden") or http_status(e) == 403:
            return AccessDenied(
                f"access denied to {action} {where} at {endpoint}: the credentials are wrong, or their policy "
                f"lacks the permission for this bucket/prefix ({message or code})"
            )
        if code in ("XAmzContentChecksumMismatch", "BadDigest", "InvalidDigest"):
            return StoreError(
                f"{endpoint} received bytes for {where} that do not match the sha256 they were sent with ({code}): "
                "they were corrupted on the way (network card, proxy) or the file changed while it was read; "
                f"nothing was stored, {action} again"
            )
        if code in _NOT_FOUND or http_status(e) == 404:
            return ObjectNotFound(f"{where} does not exist at {endpoint} (while trying to {action} it)")
        return StoreError(f"could not {action} {where} at {endpoint}: {code}: {message}")
    if isinstance(e, NoCredentialsError | PartialCredentialsError):
        return BadCredentials(
            f"no credentials to {action} {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
            "LORAFLEET_STORE_CREDENTIALS_DIR to a mounted Secret"
        )
    if isinstance(e, SSLError):
        return StoreError(
            f"TLS failed while trying to {action} {where} at {endpoint}: {e}; set AWS_CA_BUNDLE to the CA that "
            "signed the store's certificate (caBundleSecretRef)"
        )
    if isinstance(e, EndpointConnectionError | ConnectTimeoutError | ConnectionClosedError | ReadTimeoutError):
        return StoreUnavailable(
            f"could not reach {endpoint} to {action} {where} after {settings.max_attempts} attempts: {e}; check "
            "LORAFLEET_STORE_ENDPOINT and that the store is up"
        )
    if isinstance(e, BotoCoreError):
        return StoreError(f"could not {action} {where} at {endpoint}: {e}")
    return StoreError(f"could not {action} {where} at {endpoint}: {type(e).__name__}: {e}")
