"""The trainer tier: tests that need the trainer extra (torch, transformers, peft) but no server.

They run real forward passes, tokenizers and thread pools on CPU, so they are kept out of the unit tier (pure and
fast, tests/unit/conftest.py). Every test in this directory is marked ``trainer``; those needing the stack skip
without it (tests.trainer_fixtures.need_training_stack). hack/test.sh runs this directory with the others.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.trainer)
