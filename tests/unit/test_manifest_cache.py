"""The operator reads a version's manifest once per URI and digest: a pinned, verified version is never read
again, an unpinned one after its TTL, a problem (a hanging or refusing store) after a short TTL, so a bad
store is not waited on at every pass."""

from __future__ import annotations

from lorafleet.controllers.artifacts import ManifestCache
from lorafleet.resources.status import ArtifactCheck

PINNED = "sha256:" + "a" * 64


class _Store:
    def __init__(self, result: ArtifactCheck) -> None:
        self.result = result
        self.reads: list[tuple[str, str | None]] = []

    def __call__(self, store: object, namespace: str, uri: str, expected: str | None) -> ArtifactCheck:
        self.reads.append((uri, expected))
        return self.result


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_pinned_verified_versions_are_read_once() -> None:
    store, clock = _Store(ArtifactCheck(digest=PINNED, rank=16)), _Clock()
    cache = ManifestCache(store, ttl=60, failed_ttl=5, clock=clock)
    for _ in range(3):
        assert cache.get(None, "ml", "s3://b/a/v1", PINNED).rank == 16
        clock.now += 1000
    assert store.reads == [("s3://b/a/v1", PINNED)]


def test_unpinned_versions_are_read_again_after_the_ttl() -> None:
    store, clock = _Store(ArtifactCheck(digest=PINNED)), _Clock()
    cache = ManifestCache(store, ttl=60, failed_ttl=5, clock=clock)
    cache.get(None, "ml", "s3://b/a/v1", None)
    clock.now = 59
    cache.get(None, "ml", "s3://b/a/v1", None)
    assert len(store.reads) == 1
    clock.now = 61
    cache.get(None, "ml", "s3://b/a/v1", None)
    assert len(store.reads) == 2


def test_problems_are_remembered_briefly_and_keys_are_distinct() -> None:
    store, clock = _Store(ArtifactCheck(problem=("StoreUnavailable", "read timeout"))), _Clock()
    cache = ManifestCache(store, ttl=60, failed_ttl=5, clock=clock)
    assert cache.get(None, "ml", "s3://b/a/v1", PINNED).problem is not None
    cache.get(None, "ml", "s3://b/a/v1", PINNED)
    assert len(store.reads) == 1
    clock.now = 6
    cache.get(None, "ml", "s3://b/a/v1", PINNED)
    cache.get(None, "other", "s3://b/a/v1", PINNED)  # another namespace: other Secrets, another key
    assert len(store.reads) == 3


def test_the_cache_is_bounded() -> None:
    store = _Store(ArtifactCheck(digest=PINNED))
    cache = ManifestCache(store, max_entries=2, clock=_Clock())
    for version in ("v1", "v2", "v3", "v1"):
        cache.get(None, "ml", f"s3://b/a/{version}", PINNED)
    assert [uri for uri, _ in store.reads] == ["s3://b/a/v1", "s3://b/a/v2", "s3://b/a/v3", "s3://b/a/v1"]
