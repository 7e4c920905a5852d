"""Credentials never reach a status, an Event or a log line: `scrub` removes remembered credential values (whole,
repr-escaped, each line of a multi-line value) and S3 signing fields; a store that names no credentials is reached
unsigned, and the serving sidecar keeps the default store's keys for the default store's endpoint."""

from __future__ import annotations

import logging
import uuid

from lorafleet.contracts.serving import DesiredAdapter
from lorafleet.contracts.stores import ObjectStore
from lorafleet.resources.common import store_env
from lorafleet.serving.fetch import StoreFetcher
from lorafleet.storage.scrub import REDACTED, ScrubFilter, remember, scrub, scrub_tree
from lorafleet.storage.settings import StoreSettings


def _secret() -> str:
    return f"s3cr3t-{uuid.uuid4().hex}"


def test_a_remembered_secret_is_removed_raw_escaped_and_line_by_line() -> None:
    first, second = _secret(), _secret()
    value = f"{first}\n{second}"
    remember(value)
    for text in (
        f"boom: {value}",
        f"Invalid header value b'{first}\\n{second}'",  # http.client's repr of the header
        f"only the first line made it: {first}",
        f"only the second: {second}/",
    ):
        clean = scrub(text)
        assert first not in clean and second not in clean, clean
        assert REDACTED in clean


def test_extra_values_are_removed_without_being_remembered() -> None:
    value = _secret()
    assert value not in scrub(f"x {value} y", extra=[value, None])
    assert value in scrub(f"x {value} y")


def test_signing_fields_are_removed() -> None:
    text = (
        "GET https://s3/b/k?AWSAccessKeyId=AKIAEXAMPLE&Signature=abc%2Fdef&Expires=1 "
        "X-Amz-Credential=AKIA%2F2026%2Fus-east-1&X-Amz-Signature=0123abcd&X-Amz-Security-Token=tok "
        "Authorization: AWS4-HMAC-SHA256 Credential=AKIAX/20261203/us-east-1/s3/aws4_request, SignedHeaders=host"
    )
    clean = scrub(text)
    for leaked in ("AKIAEXAMPLE", "abc%2Fdef", "AKIA%2F2026", "0123abcd", "tok ", "AKIAX"):
        assert leaked not in clean, clean
    assert "Expires=1" in clean and "SignedHeaders=host" in clean


def test_a_short_plausible_key_id_is_kept_outside_signing_fields() -> None:
    # MinIO's user "lorafleet" also names the default bucket: it is an identifier, not a secret.
    remember(key_id="lorafleet")
    assert scrub("s3://lorafleet/adapters/x") == "s3://lorafleet/adapters/x"
    # A key id that cannot be one (a secret read through a tenant-chosen key name) is removed everywhere.
    odd = f"{_secret()}\nmore"
    remember(key_id=odd)
    assert odd.splitlines()[0] not in scrub(f"value {odd.splitlines()[0]}")


def test_scrub_tree_reaches_every_string_of_a_status() -> None:
    value = _secret()
    remember(value)
    status = {"conditions": [{"type": "Ready", "message": f"x {value}"}], "adapters": [{"message": value}], "n": 3}
    clean = scrub_tree(status)
    assert value not in repr(clean)
    assert clean["n"] == 3


def test_the_log_filter_scrubs_arguments_and_tracebacks() -> None:
    value = _secret()
    remember(value)
    try:
        raise RuntimeError(f"failed with {value}")
    except RuntimeError:
        import sys

        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "store said %s", (value,), sys.exc_info())
    assert ScrubFilter().filter(record)
    rendered = logging.Formatter().format(record)
    assert value not in rendered and "store said" in rendered and "RuntimeError" in rendered


def test_a_store_without_credentials_renders_anonymous_unless_it_is_the_platform_default() -> None:
    store = ObjectStore(endpoint="https://elsewhere:9000")
    names = {e["name"]: e.get("value") for e in store_env(store)}
    assert names["LORAFLEET_STORE_ANONYMOUS"] == "true"
    assert "LORAFLEET_STORE_ANONYMOUS" not in {e["name"] for e in store_env(store, platform=True)}
    assert StoreSettings.from_env(names).anonymous  # type: ignore[arg-type]
    assert StoreSettings.from_object_store(store).anonymous
    assert not StoreSettings.from_object_store(store, "id", "secret").anonymous


def test_the_sidecar_sends_the_default_keys_only_to_the_default_endpoint() -> None:
    fetcher = StoreFetcher(
        {
            "LORAFLEET_STORE_ENDPOINT": "http://minio.platform:9000/",
            "AWS_ACCESS_KEY_ID": "platform-id",
            "AWS_SECRET_ACCESS_KEY": _secret(),
        }
    )

    def settings_for(endpoint: str | None) -> StoreSettings:
        store = ObjectStore(endpoint=endpoint) if endpoint else None
        want = DesiredAdapter(name="a", uri="s3://bucket/a/v1", store=store)
        return fetcher.store_for(want).settings

    own = settings_for("http://minio.platform:9000")
    assert own.secret_access_key and not own.anonymous
    assert settings_for(None).secret_access_key
    foreign = settings_for("http://attacker.example:9000")
    assert foreign.anonymous and foreign.access_key_id is None and foreign.secret_access_key is None


def test_a_spec_store_uses_its_secret_only_at_an_allowed_endpoint() -> None:
    from lorafleet.api.common import ObjectStore as SpecStore
    from lorafleet.api.common import S3CredentialsRef
    from lorafleet.config import OperatorSettings
    from lorafleet.resources.stores import RenderError, credentials_refusal, resolve_store

    settings = OperatorSettings(store_endpoint="http://minio.platform:9000", store_allowed_endpoints=["https://team/"])
    creds = S3CredentialsRef(name="creds")
    assert (
        credentials_refusal(
            SpecStore(endpoint="http://minio.platform:9000/", credentials_secret_ref=creds), settings, "f"
        )
        is None
    )
    assert credentials_refusal(SpecStore(endpoint="https://team", credentials_secret_ref=creds), settings, "f") is None
    assert credentials_refusal(SpecStore(endpoint="https://elsewhere"), settings, "f") is None  # no Secret: unsigned
    elsewhere = SpecStore(endpoint="https://elsewhere", credentials_secret_ref=creds)
    message = credentials_refusal(elsewhere, settings, "spec.output.store")
    assert message is not None and "spec.output.store.endpoint https://elsewhere" in message
    assert "artifactStore.allowedEndpoints" in message
    try:
        resolve_store(elsewhere, settings, "spec.output.store")
    except RenderError as e:
        assert e.reason == "StoreNotAllowed"
    else:
        raise AssertionError("a Secret at an endpoint the platform does not allow was rendered")
