"""The CRD's object store settings as pods read them: the same fields and checks, unknown fields ignored (a field
added to the CRD must not make an older pod refuse its config)."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from lorafleet.api import common as api_common

IGNORE_UNKNOWN = ConfigDict(extra="ignore")


class S3CredentialsRef(api_common.S3CredentialsRef):
    model_config = IGNORE_UNKNOWN


class SecretKeySelector(api_common.SecretKeySelector):
    model_config = IGNORE_UNKNOWN


class ObjectStore(api_common.ObjectStore):
    model_config = IGNORE_UNKNOWN

    credentials_secret_ref: S3CredentialsRef | None = Field(
        default=None, description="Secret with the access key id and secret access key."
    )
    ca_bundle_secret_ref: SecretKeySelector | None = Field(
        default=None, description="Secret key holding a PEM CA bundle to verify the store's TLS certificate."
    )
