"""Short-lived store credentials for one namespace's workloads: STS AssumeRole with an inline session policy.

The operator holds the platform's keys; a workload gets keys that expire and reach only its namespace's root
(read-write) plus the read-only inputs it names (a shared base model, a dataset). The store enforces the policy,
so a tenant who reads the minted Secret gets no more than its own prefix. MinIO (root or a user with keys), Ceph
RGW and AWS implement AssumeRole with a `Policy` parameter; the effective rights are the intersection of the
caller's and the session policy's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.config import Config

from lorafleet.io_metrics import count_botocore_sends
from lorafleet.storage.client import translate
from lorafleet.storage.errors import StoreError
from lorafleet.storage.scrub import remember
from lorafleet.storage.settings import StoreSettings
from lorafleet.storage.sts_policy import SECRET_KEYS, Grant, bucket_key, session_name, session_policy

# AWS's and MinIO's lower bound; MinIO's default is one hour.
MIN_DURATION_SECONDS = 900
# MinIO ignores the role ARN of a plain AssumeRole; AWS and Ceph need a real one (a setting).
DEFAULT_ROLE_ARN = "arn:aws:iam::000000000000:role/lorafleet-workload"


@dataclass(frozen=True)
class MintedCredentials:
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expiration: datetime

    def secret_data(self) -> dict[str, str]:
        """The Secret's stringData, keys as SECRET_KEYS."""
        return dict(zip(SECRET_KEYS, (self.access_key_id, self.secret_access_key, self.session_token), strict=True))


def _sts_client(settings: StoreSettings) -> Any:
    """boto3's STS client at the store's endpoint (MinIO and Ceph RGW serve STS there), signed with the
    platform's keys; never anonymous: an unsigned AssumeRole cannot succeed."""
    remember(settings.secret_access_key, settings.session_token, key_id=settings.access_key_id)
    session = boto3.session.Session(
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        aws_session_token=settings.session_token,
        region_name=settings.region,
    )
    config = Config(
        region_name=settings.region,
        retries={"mode": "standard", "max_attempts": settings.max_attempts},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
    )
    client = session.client("sts", endpoint_url=settings.endpoint, verify=settings.verify, config=config)
    count_botocore_sends(client, "sts")
    return client


def mint(
    settings: StoreSettings,
    grant: Grant,
    *,
    duration_seconds: int,
    namespace: str,
    name: str,
    role_arn: str = DEFAULT_ROLE_ARN,
) -> MintedCredentials:
    """Credentials limited to `grant`, valid `duration_seconds`, minted with `settings`' (the platform's) keys
    for the workload `namespace/name`. The minted values are remembered for scrubbing before they are returned;
    errors are StoreErrors with credentials scrubbed."""
    if duration_seconds < MIN_DURATION_SECONDS:
        raise StoreError(f"STS duration {duration_seconds} s is below the minimum of {MIN_DURATION_SECONDS} s")
    if not grant.read_write and not grant.read_only:
        raise StoreError("nothing to grant: a session policy needs at least one s3:// location")
    bucket = bucket_key((grant.read_write or grant.read_only)[0])[0]
    try:
        response = _sts_client(settings).assume_role(
            RoleArn=role_arn,
            RoleSessionName=session_name(namespace, name),
            Policy=json.dumps(session_policy(grant), separators=(",", ":")),
            DurationSeconds=duration_seconds,
        )
    except Exception as e:  # every botocore failure becomes a scrubbed StoreError naming the action
        raise translate(
            e, settings, bucket, None, f"mint STS credentials (AssumeRole) for {namespace}/{name} in"
        ) from e
    creds = response["Credentials"]
    remember(creds["SecretAccessKey"], creds["SessionToken"], key_id=creds["AccessKeyId"])
    expiration = creds["Expiration"]
    if isinstance(expiration, str):
        expiration = datetime.fromisoformat(expiration.replace("Z", "+00:00"))
    return MintedCredentials(
        access_key_id=creds["AccessKeyId"],
        secret_access_key=creds["SecretAccessKey"],
        session_token=creds["SessionToken"],
        expiration=expiration.astimezone(UTC),
    )
