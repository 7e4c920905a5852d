"""The watch-fed cache's store never moves an object back to an older resourceVersion (a write-through of our own
write can arrive before the watch event that announces it), reports exactly the changes a relist found, and the
caches keep only metadata and status of children and pods (and of a ConfigMap, a trainer's progress within its cap)."""

from __future__ import annotations

from typing import Any

from lorafleet.contracts.trainer import MAX_PROGRESS_BYTES, PROGRESS_KEY
from lorafleet.controllers.caches import metadata_and_status, whole
from lorafleet.controllers.informer import Store, newer_or_same


def obj(name: str, rv: str, ns: str = "team-a", **labels: str) -> dict[str, Any]:
    return {"kind": "Job", "metadata": {"name": name, "namespace": ns, "resourceVersion": rv, "labels": labels}}


def test_resource_versions_compare_as_integers_and_opaque_ones_count_as_newer() -> None:
    assert newer_or_same("10", "9")
    assert newer_or_same("9", "9")
    assert not newer_or_same("9", "10")
    assert newer_or_same("abc", "10")


def test_events_add_modify_and_delete() -> None:
    store = Store()
    assert store.apply("ADDED", obj("a", "1")) == ("ADDED", obj("a", "1"))
    assert store.apply("MODIFIED", obj("a", "2"))[0] == "MODIFIED"  # type: ignore[index]
    assert store.get("team-a", "a") == obj("a", "2")
    assert store.apply("DELETED", obj("a", "3")) == ("DELETED", obj("a", "2"))
    assert store.get("team-a", "a") is None
    assert len(store) == 0


def test_an_older_event_never_overwrites_a_newer_write_through() -> None:
    store = Store()
    store.apply("MODIFIED", obj("a", "7"))  # our write's answer
    assert store.apply("MODIFIED", obj("a", "6")) is None  # the watch lags behind
    assert store.get("team-a", "a") == obj("a", "7")
    assert store.apply("MODIFIED", obj("a", "7")) is None  # the echo of our own write is no change
    # A DELETED event about an older incarnation does not remove the object created again since.
    assert store.apply("DELETED", obj("a", "5")) is None
    assert store.get("team-a", "a") is not None


def test_select_by_namespace_and_labels() -> None:
    store = Store()
    store.apply("ADDED", obj("a", "1", owner="x"))
    store.apply("ADDED", obj("b", "2", owner="y"))
    store.apply("ADDED", obj("c", "3", ns="team-b", owner="x"))
    assert [o["metadata"]["name"] for o in store.select("team-a", {"owner": "x"})] == ["a"]
    assert sorted(o["metadata"]["name"] for o in store.select(None, {"owner": "x"})) == ["a", "c"]
    assert len(store.select("team-a")) == 2
    assert store.select("team-c", {"owner": "x"}) == []


def test_a_relist_reports_what_changed_while_the_watch_was_gone() -> None:
    store = Store()
    for o in (obj("kept", "1"), obj("changed", "2"), obj("gone", "3")):
        store.apply("ADDED", o)
    changes = store.replace([obj("kept", "1"), obj("changed", "9"), obj("new", "10")])
    assert sorted((t, o["metadata"]["name"]) for t, o in changes) == [
        ("ADDED", "new"),
        ("DELETED", "gone"),
        ("MODIFIED", "changed"),
    ]
    assert store.get("team-a", "gone") is None


def test_children_are_kept_as_metadata_and_status_only() -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "j", "managedFields": [{"manager": "x"}], "annotations": {"a": "b"}},
        "spec": {"template": {"spec": {"containers": [{"name": "trainer"}]}}},
        "status": {"active": 1},
    }
    kept = metadata_and_status(job)
    assert kept == {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "annotations": {"a": "b"}},
                    "status": {"active": 1}}  # fmt: skip
    assert "spec" in whole(job) and "managedFields" not in whole(job)["metadata"]
    store = Store(metadata_and_status)
    store.apply("ADDED", {**job, "metadata": {**job["metadata"], "namespace": "n", "resourceVersion": "1"}})
    assert "spec" not in (store.get("n", "j") or {})


def test_of_a_config_map_only_the_progress_key_within_its_cap_is_kept() -> None:
    def config_map(data: dict[str, str]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": data}

    progress = '{"version":1,"step":3}'
    assert metadata_and_status(config_map({PROGRESS_KEY: progress, "trainer.json": "{}"}))["data"] == {
        PROGRESS_KEY: progress
    }
    assert "data" not in metadata_and_status(config_map({"trainer.json": "{}"}))
    assert "data" not in metadata_and_status(config_map({PROGRESS_KEY: "é" * MAX_PROGRESS_BYTES}))
    assert "data" not in metadata_and_status({**config_map({PROGRESS_KEY: progress}), "kind": "Secret"})


def test_a_store_keeps_only_the_namespaces_it_admits() -> None:
    """An operator watching namespace globs lists cluster-wide: objects of other namespaces never enter its cache
    (nor, so, its reconciles: another operator may own them)."""
    store = Store(admit=lambda ns: ns.startswith("team-"))
    assert store.apply("ADDED", obj("a", "1", ns="team-a")) is not None
    assert store.apply("ADDED", obj("b", "2", ns="other")) is None
    assert [o["metadata"]["name"] for o in store.select(None)] == ["a"]
    assert [
        c[1]["metadata"]["name"] for c in store.replace([obj("c", "3", ns="other"), obj("a", "1", ns="team-a")])
    ] == []
    assert store.get("other", "c") is None
