"""Shared pytest plugins (the fixtures of each real component live in a module of their own) and the tiers.

Each test is marked by its folder: ``unit`` (tests/unit: pure, fast, guarded by tests/unit/conftest.py),
``trainer`` (tests/trainer: the trainer extra, no server), ``integration`` and ``e2e`` (their own conftests).
A unit test that asks for a heavy fixture (a cluster, MinIO, vLLM, the tiny model) is a collection error.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = [
    "tests.integration.operator_fixtures",
    "tests.s3_fixtures",
    "tests.trainer_fixtures",
    "tests.serving_fixtures",
]

UNIT = Path(__file__).parent / "unit"
# Fixtures that start a server or a process, build from source or load torch: never in the unit tier.
HEAVY_FIXTURES = frozenset(
    {
        "cluster",
        "namespace",
        "crds",
        "operator",
        "stored_model",
        "s3_server",
        "private_s3_server",
        "s3_bucket",
        "store_settings",
        "artifact_store",
        "serving_base_dir",
        "lora_dirs",
        "serving_pod",
        "tiny_model_dir",
        "tiny_adapter_dir",
        "trainer_env",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    offenders = []
    for item in items:
        if UNIT in item.path.parents:
            item.add_marker(pytest.mark.unit)
            heavy = sorted(HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())))
            if heavy:
                offenders.append(f"{item.nodeid} uses {', '.join(heavy)}")
    if offenders:
        raise pytest.UsageError(
            "heavy fixtures in the unit tier (move these tests to tests/integration or tests/trainer):\n  "
            + "\n  ".join(offenders)
        )
