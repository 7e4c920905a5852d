"""CPU threads of the trainer: the cgroup quota caps torch's threads (torch counts the node's cores)."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_cpu_quota_v2_and_v1(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from lorafleet.trainer.runtime import cpu_quota

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("250000 100000\n")
    assert cpu_quota(v2) == 2.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v1) == 4.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(v1) is None
    assert cpu_quota(tmp_path / "none") is None


def test_cpu_threads_is_at_least_one() -> None:
    pytest.importorskip("torch")
    from lorafleet.trainer.runtime import cpu_threads

    assert cpu_threads() >= 1
