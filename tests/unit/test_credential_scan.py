"""The credential scan (lorafleet_dev.credential_scan) finds each line of a secret value wherever it appears and
names the place and the value's source, never the value; short values and identifiers (key ids, endpoints) are
not scanned, so innocent text does not fail the run."""

from __future__ import annotations

import base64

from lorafleet_dev.credential_scan import MIN_LENGTH, Scanner, fragments, secret_values


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_secret_values_skip_identifiers_short_and_binary_values() -> None:
    secret = {
        "metadata": {"namespace": "team-a", "name": "store"},
        "data": {
            "AWS_ACCESS_KEY_ID": _b64("AKIAEXAMPLEKEYID"),
            "AWS_SECRET_ACCESS_KEY": _b64("s3cr3t-value-123"),
            "endpoint": _b64("http://minio.team-a:9000"),
            "pin": _b64("1234"),
            "blob": base64.b64encode(b"\xff\xfe\x00binary!!").decode(),
        },
        "stringData": {"apiKey": "sk-team-a-7f3a9c"},
    }
    assert secret_values(secret) == {
        "Secret team-a/store key AWS_SECRET_ACCESS_KEY": "s3cr3t-value-123",
        "Secret team-a/store key apiKey": "sk-team-a-7f3a9c",
    }


def test_each_line_of_a_value_is_found_and_reported_without_the_value() -> None:
    scanner = Scanner()
    value = "firstHALFofKEY\nsecondHALFofKEY"
    scanner.add("Secret team-a/store key secret", value)
    scanner.add("short", "x" * (MIN_LENGTH - 1))
    assert fragments(value) == ["firstHALFofKEY", "secondHALFofKEY"]

    assert scanner.scan("FineTuneJob team-a/x status", "Invalid header value b'secondHALFofKEY'")
    assert not scanner.scan("Event team-a/y", "x" * 20 + " [REDACTED]")
    log = "started\nsigning with firstHALFofKEY\nok\n"
    found = scanner.scan_lines("operator.log", log)
    assert [f.where for f in found] == ["operator.log:2"]
    report = scanner.report()
    assert "FineTuneJob team-a/x status: the value of Secret team-a/store key secret" in report
    assert "operator.log:2" in report and "HALFofKEY" not in report
