"""A run stops before it starts when the disk cannot hold it, and rebuilt images do not pile up on the disk.

* hack/lib/prereqs.sh's ensure_disk: with less available than NEED GiB plus 1% of the filesystem (what MinIO keeps
  free: below it every write fails with XMinioStorageFull) it returns 1 and prints exactly ONE line naming the
  filesystem, the space needed and the fix; with enough it returns 0 silently. Its clean-up removes only
  lorafleet's leftovers in TMPDIR that nothing has touched for an hour, never a fresh one (a running demo's or
  benchmark's), a running pytest session's basetemp nor anything else. Real bash and df on this machine's
  filesystem (LORAFLEET_DISK_PATHS points the check at the test's folder).
* lorafleet_dev.images (as root, with buildah): a rebuild removes the image it replaced, and an old build stage
  once no build uses it, but keeps the current build stage (dangling to buildah, yet the ``--layers`` cache the
  next build reuses)."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from lorafleet_dev import images
from lorafleet_dev.paths import REPO


def bash(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; source hack/lib/prereqs.sh; {script}"],  # as hack/test.sh runs it
        cwd=REPO,
        env={**os.environ, "LORAFLEET_DISK_PATHS": str(tmp_path), "TMPDIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_enough_space_passes_silently(tmp_path: Path) -> None:
    proc = bash("ensure_disk hack/test.sh 0", tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_too_little_space_fails_in_one_line_naming_the_fix(tmp_path: Path) -> None:
    stat = os.statvfs(tmp_path)
    proc = bash("ensure_disk hack/test.sh 100000", tmp_path, LORAFLEET_DISK_FREE="0")
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    mount = subprocess.run(["df", "-P", str(tmp_path)], capture_output=True, text=True).stdout.split()[-1]
    match = re.fullmatch(
        r"hack/test\.sh: only ([\d.]+) GiB free on (\S+) \(mounted at (\S+)\); hack/test\.sh needs about 100000 GiB "
        r"plus 1% of the filesystem \(([\d.]+) GiB\) that MinIO keeps free: free space "
        r"\(largest lorafleet users: .*\)",
        lines[0],
    )
    assert match, lines[0]
    assert match[3] == mount
    assert abs(float(match[1]) - stat.f_bavail * stat.f_frsize / 2**30) < 1.0  # df's Available, not its Free
    assert abs(float(match[4]) - stat.f_blocks * stat.f_frsize / 100 / 2**30) < 0.1


def test_a_missing_path_is_checked_on_its_parents_filesystem(tmp_path: Path) -> None:
    missing = tmp_path / "not" / "created"
    proc = bash("ensure_disk hack/demo.sh 100000", tmp_path, LORAFLEET_DISK_PATHS=str(missing), LORAFLEET_DISK_FREE="0")
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert bash("ensure_disk hack/demo.sh 0", tmp_path, LORAFLEET_DISK_PATHS=str(missing)).returncode == 0


def test_clean_up_removes_only_stale_lorafleet_leftovers(tmp_path: Path) -> None:
    user = pwd.getpwuid(os.getuid()).pw_name
    names = [
        "lorafleet-demo-old",
        "lfbench-abcde-old",
        "lorafleet-bench-old",
        f"pytest-of-{user}/pytest-7",
        "lorafleet-demo-fresh",
        f"pytest-of-{user}/pytest-8",
        f"pytest-of-{user}/pytest-9",
        "someone-elses-old",
    ]
    for name in names:
        (tmp_path / name / "minio").mkdir(parents=True)
        (tmp_path / name / "minio" / "part.1").write_bytes(b"x" * 1024)
    two_hours_ago = time.time() - 7200
    for name in names:
        if "fresh" in name or name.endswith("pytest-8"):
            continue
        for path in (tmp_path / name, tmp_path / name / "minio", tmp_path / name / "minio" / "part.1"):
            os.utime(path, (two_hours_ago, two_hours_ago))
    # A folder whose own time is old but that a running process still writes into stays, and so does the basetemp
    # of a pytest session still running (its .lock holds its pid: here this process's), however old.
    os.utime(tmp_path / "lorafleet-demo-fresh", (two_hours_ago, two_hours_ago))
    lock = tmp_path / f"pytest-of-{user}" / "pytest-9" / ".lock"
    lock.write_text(str(os.getpid()))
    os.utime(lock, (two_hours_ago, two_hours_ago))
    os.utime(lock.parent, (two_hours_ago, two_hours_ago))
    dead = tmp_path / f"pytest-of-{user}" / "pytest-7" / ".lock"  # a crashed session's: no such process
    dead.write_text("999999999")
    os.utime(dead, (two_hours_ago, two_hours_ago))
    os.utime(dead.parent, (two_hours_ago, two_hours_ago))

    proc = bash(f"_disk_free_tmp {tmp_path}", tmp_path)

    assert (proc.returncode, proc.stderr) == (0, "")
    left = {name for name in names if (tmp_path / name).exists()}
    assert left == {
        "lorafleet-demo-fresh",
        f"pytest-of-{user}/pytest-8",
        f"pytest-of-{user}/pytest-9",
        "someone-elses-old",
    }


@pytest.mark.skipif(images.missing_prerequisites(images.BUILD_TOOLS) is not None, reason="needs root and buildah")
def test_a_rebuild_removes_what_it_replaced_and_keeps_the_stage_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images.base_image(log=lambda _: None)  # in the real cache: built once
    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path / "cache"))  # this test's build records and logs
    token = uuid.uuid4().hex[:12]
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        f"FROM {images.BASE_IMAGE} AS deps\nLABEL dev.lorafleet.test={token}\nCOPY a /a.src\nRUN cp /a.src /a\n"
        f"FROM {images.BASE_IMAGE}\nLABEL dev.lorafleet.test={token}\nCOPY --from=deps /a /a\nCOPY b /b\n"
    )
    ref = f"localhost/lorafleet-disk-test-{token}:1"

    def build(a: str, b: str) -> tuple[str, set[str]]:
        (ctx / "a").write_text(a)
        (ctx / "b").write_text(b)
        image = images.buildah_bud(ctx / "Dockerfile", ctx, ref, label="disk-test", log=lambda _: None)
        record = images._recorded(images._used_record("disk-test"))
        return image.image_id, set(images.dangling_images()) & record - {image.image_id}

    try:
        v1, stage1 = build("a1", "b1")
        assert len(stage1) == 1, "the deps stage's last image: dangling, and recorded as used"
        v2, stage2 = build("a1", "b2")  # the final stage changes, deps is a cache hit
        present = images.all_image_ids()
        assert v1 not in present, "the replaced image is removed"
        assert stage2 == stage1 and stage1 <= present, "the stage cache stays"
        v3, stage3 = build("a2", "b2")  # deps changes
        present = images.all_image_ids()
        assert v2 not in present and not stage1 & present, "the replaced image and the old stage are removed"
        assert len(stage3) == 1 and stage3 <= present
        _, stage4 = build("a2", "b3")
        log = (tmp_path / "cache" / "images" / "logs" / "disk-test.log").read_text()
        assert stage4 == stage3 and f"Using cache {next(iter(stage3))[7:]}" in log, "the next build reuses it"
        assert v3 not in images.all_image_ids()
    finally:
        subprocess.run(["buildah", "rmi", ref], capture_output=True)
        ours = subprocess.run(
            ["buildah", "images", "--all", "--no-trunc", "--filter", f"label=dev.lorafleet.test={token}",
             "--format", "{{.ID}}"],
            capture_output=True, text=True,
        ).stdout.split()  # fmt: skip
        for image_id in ours:  # children before parents: the newest first
            subprocess.run(["buildah", "rmi", image_id], capture_output=True)
