"""The AdapterDeployment's promotion gate and canary spec (pure: resources.status.adapterdeployment and the
controller's plan).

Invariants: a version whose adapter requires an evaluation is in the desired set only when the evaluation in its
manifest reaches every bar, pinned to the digest of that manifest; without an evaluation it is Pending with reason
NotEvaluated, below a bar Pending with BelowQualityBar naming the missed bars, with an unreadable manifest Pending
with the store's reason; the deployment is then Degraded and says why. A canary puts each version in the desired
set with its served name, version and weight, and its status reports each version and the worst of them. The
spec refuses weights that do not sum to 100, repeated version names and entries with two sources or none.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from lorafleet.api.adapterdeployment import AdapterSpec
from lorafleet.config import OperatorSettings
from lorafleet.contracts.evaluation import EVALUATION_KEY
from lorafleet.contracts.serving import DESIRED_FILE
from lorafleet.controllers import adapterdeployment as ad_controller
from lorafleet.resources.conditions import get_condition
from lorafleet.resources.status import ArtifactCheck, resolve_adapters
from lorafleet.resources.status.adapterdeployment import AdapterDeploymentObserved, adapterdeployment_status
from lorafleet.resources.status.common import status_dict
from tests.unit import objects

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
SETTINGS = OperatorSettings(store_endpoint="http://minio:9000", store_uri="s3://lorafleet")
STORED = "sha256:" + "c" * 64
BARS = [{"metric": "rougeL", "minScore": 0.5}, {"metric": "exactMatch", "minImprovement": 0.1}]
PASSING = {"metrics": {"rougeL": {"base": 0.2, "adapter": 0.7}, "exactMatch": {"base": 0.1, "adapter": 0.4}}}
FAILING = {"metrics": {"rougeL": {"base": 0.2, "adapter": 0.3}, "exactMatch": {"base": 0.1, "adapter": 0.15}}}


def _artifact(version: str) -> dict[str, Any]:
    return {"uri": f"s3://lorafleet/ml/adapters/bot/{version}"}


def _ad(*adapters: dict[str, Any]) -> Any:
    obj = objects.adapter_deployment(adapters=list(adapters), replicas=1)
    return objects.adapter_deployment_obj(obj)


def _check(evaluation: dict[str, Any] | None) -> ArtifactCheck:
    return ArtifactCheck(digest=STORED, rank=8, evaluation=evaluation)


def test_a_passing_version_is_served_pinned_to_the_manifest_that_passed() -> None:
    ad = _ad({"name": "bot", "artifact": _artifact("v1"), "requireEvaluation": BARS})
    resolved, waiting = resolve_adapters(ad, {}, {"bot": _check(PASSING)})
    assert waiting == {}
    assert [(a.name, a.digest) for a in resolved] == [("bot", STORED)]


@pytest.mark.parametrize(
    ("check", "reason", "words"),
    [
        pytest.param(_check(None), "NotEvaluated", ["holds no evaluation", "spec.evaluation"], id="no-evaluation"),
        pytest.param(
            _check(FAILING),
            "BelowQualityBar",
            ["rougeL 0.3 is not at least 0.5", "exactMatch improves on the base by +0.05, less than 0.1"],
            id="below",
        ),
        pytest.param(
            _check({"metrics": {"rougeL": {"adapter": 0.9}}}),
            "BelowQualityBar",
            ["exactMatch was not measured"],
            id="metric-missing",
        ),
        pytest.param(
            ArtifactCheck(problem=("StoreUnavailable", "connection refused")),
            "StoreUnavailable",
            ["could not be read", "connection refused"],
            id="store-down",
        ),
        pytest.param(None, "NotEvaluated", ["not been read"], id="not-read"),
    ],
)
def test_a_version_without_a_passing_evaluation_is_pending_and_not_served(
    check: ArtifactCheck | None, reason: str, words: list[str]
) -> None:
    ad = _ad({"name": "bot", "artifact": _artifact("v1"), "requireEvaluation": BARS})
    manifests = {"bot": check} if check is not None else {}
    resolved, waiting = resolve_adapters(ad, {}, manifests)
    assert resolved == []
    state = waiting["bot"]
    assert (state.state, state.reason) == ("Pending", reason)
    for word in words:
        assert word in (state.message or ""), state.message


def test_no_bars_no_gate() -> None:
    ad = _ad({"name": "bot", "artifact": _artifact("v1")})
    resolved, _ = resolve_adapters(ad, {}, {})
    assert [a.name for a in resolved] == ["bot"]


def _plan(ad: Any, manifests: dict[str, ArtifactCheck]) -> dict[str, Any]:
    base = objects.basemodel_obj(objects.ready(objects.base_model()))
    children, error = ad_controller.plan(ad, base, {}, SETTINGS, {}, manifests)
    assert error is None and children is not None
    config_map = next(c for c in children if c["kind"] == "ConfigMap")
    desired: dict[str, Any] = json.loads(config_map["data"][DESIRED_FILE])
    return desired


def test_the_desired_set_holds_only_versions_that_pass_with_their_weights() -> None:
    ad = _ad(
        {
            "name": "support-bot",
            "requireEvaluation": BARS,
            "versions": [
                {"name": "v3", "artifact": _artifact("v3"), "weight": 90},
                {"name": "v4", "artifact": _artifact("v4"), "weight": 10},
            ],
        },
        {"name": "sql", "artifact": _artifact("sql")},
    )
    desired = _plan(ad, {"support-bot:v3": _check(PASSING), "support-bot:v4": _check(FAILING)})
    assert desired["adapters"] == [
        {"name": "support-bot:v3", "servedName": "support-bot", "version": "v3", "weight": 90,
         "uri": _artifact("v3")["uri"], "digest": STORED, "store": None},
        {"name": "sql", "uri": _artifact("sql")["uri"], "digest": None, "store": None},
    ]  # fmt: skip
    both = _plan(ad, {"support-bot:v3": _check(PASSING), "support-bot:v4": _check(PASSING)})
    assert [(a["name"], a.get("weight")) for a in both["adapters"]] == [
        ("support-bot:v3", 90), ("support-bot:v4", 10), ("sql", None),
    ]  # fmt: skip


def _status(ad: Any, manifests: dict[str, ArtifactCheck], reports: dict[str, Any] | None = None) -> dict[str, Any]:
    observed = AdapterDeploymentObserved(
        objects.basemodel_obj(objects.ready(objects.base_model())),
        {},
        {"status": {"replicas": 1, "readyReplicas": 1}},
        "chat.ml.svc",
        reports,
        manifests=manifests,
    )
    return status_dict(adapterdeployment_status(ad, observed, NOW))


def _loaded(n: int = 1) -> dict[str, Any]:
    return {"state": "Loaded", "reason": "Loaded", "message": f"loaded on {n}/1 replicas", "loadedReplicas": n}


def test_the_status_says_which_adapter_waits_for_its_bar() -> None:
    ad = _ad(
        {"name": "bot", "artifact": _artifact("v1"), "requireEvaluation": BARS},
        {"name": "sql", "artifact": _artifact("sql")},
    )
    status = _status(ad, {"bot": _check(FAILING)}, {"sql": _loaded()})
    bot, sql = status["adapters"]
    assert (bot["state"], bot["reason"]) == ("Pending", "BelowQualityBar")
    assert sql["state"] == "Loaded"
    assert status["phase"] == "Degraded"
    ready = get_condition(status["conditions"], "Ready")
    degraded = get_condition(status["conditions"], "Degraded")
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", "BelowQualityBar")
    assert degraded is not None and degraded["status"] == "True" and "bot: below the quality bar" in degraded["message"]

    unevaluated = _status(ad, {"bot": _check(None)}, {"sql": _loaded()})
    assert unevaluated["adapters"][0]["reason"] == "NotEvaluated"
    assert get_condition(unevaluated["conditions"], "Ready")["reason"] == "NotEvaluated"  # type: ignore[index]

    passed = _status(ad, {"bot": _check(PASSING)}, {"bot": _loaded(), "sql": _loaded()})
    assert passed["phase"] == "Ready" and [a["state"] for a in passed["adapters"]] == ["Loaded", "Loaded"]


def test_a_canary_reports_each_version_and_the_worst() -> None:
    ad = _ad(
        {
            "name": "support-bot",
            "requireEvaluation": BARS,
            "versions": [
                {"name": "v3", "artifact": _artifact("v3"), "weight": 90},
                {"name": "v4", "artifact": _artifact("v4"), "weight": 10},
            ],
        }
    )
    manifests = {"support-bot:v3": _check(PASSING), "support-bot:v4": _check(FAILING)}
    (entry,) = _status(ad, manifests, {"support-bot:v3": _loaded()})["adapters"]
    assert (entry["name"], entry["state"], entry["reason"]) == ("support-bot", "Pending", "BelowQualityBar")
    assert "version v4" in entry["message"] and "v3 90%, v4 10%" in entry["message"]
    assert [(v["name"], v["weight"], v["state"]) for v in entry["versions"]] == [
        ("v3", 90, "Loaded"), ("v4", 10, "Pending"),
    ]  # fmt: skip

    manifests["support-bot:v4"] = _check(PASSING)
    status = _status(ad, manifests, {"support-bot:v3": _loaded(), "support-bot:v4": _loaded()})
    assert status["phase"] == "Ready"
    assert status["adapters"][0]["state"] == "Loaded" and status["adapters"][0]["loadedReplicas"] == 1


def test_ranks_and_slots_count_every_version() -> None:
    ad = _ad(
        {"name": "bot", "versions": [
            {"name": "a", "fineTuneJobRef": {"name": "job-a"}, "weight": 50},
            {"name": "b", "artifact": _artifact("b"), "weight": 50},
        ]},
    )  # fmt: skip
    job = objects.fine_tune_job_obj(objects.fine_tune_job(name="job-a", lora={"r": 32}))
    ranks = ad_controller.adapter_ranks(ad, {"job-a": job}, {"bot:b": 64})
    assert ranks == {"bot:a": 32, "bot:b": 64}
    assert ad_controller._fine_tune_job_names(ad) == ["job-a"]


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param({"name": "a", "versions": [{"name": "v1", "artifact": _artifact("1"), "weight": 90},
                                                {"name": "v2", "artifact": _artifact("2"), "weight": 20}]},
                     id="sum-110"),
        pytest.param({"name": "a", "versions": [{"name": "v1", "artifact": _artifact("1"), "weight": 50},
                                                {"name": "v1", "artifact": _artifact("2"), "weight": 50}]},
                     id="same-version-twice"),
        pytest.param({"name": "a", "artifact": _artifact("1"),
                      "versions": [{"name": "v1", "artifact": _artifact("1"), "weight": 100}]}, id="two-sources"),
        pytest.param({"name": "a"}, id="no-source"),
        pytest.param({"name": "a", "versions": [{"name": "v1", "weight": 100}]}, id="version-without-source"),
        pytest.param({"name": "a", "versions": [{"name": "v1", "artifact": _artifact("1"), "weight": 101}]},
                     id="weight-over-100"),
        pytest.param({"name": "a", "versions": [{"name": "v:1", "artifact": _artifact("1"), "weight": 100}]},
                     id="separator-in-version"),
    ],
)  # fmt: skip
def test_the_spec_refuses_bad_canaries(entry: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AdapterSpec.model_validate(entry)


def test_the_evaluation_key_is_where_the_manifest_keeps_it() -> None:
    from lorafleet.storage.manifest import Manifest

    assert EVALUATION_KEY in Manifest.model_fields


def test_a_versions_artifact_keeps_to_the_namespaces_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """A canary's version is bound like any artifact: another namespace's adapters are not served through it."""
    from lorafleet.controllers import store_refs

    monkeypatch.setattr(store_refs, "SETTINGS", SETTINGS)
    theirs = {"uri": "s3://lorafleet/team-b/adapters/bot/v1"}
    ad = _ad({"name": "bot", "versions": [
        {"name": "v1", "artifact": _artifact("v1"), "weight": 50},
        {"name": "v2", "artifact": theirs, "weight": 50},
    ]})  # fmt: skip
    _, error = store_refs.bind_adapterdeployment(ad)
    assert error is not None and error.reason == "StoreNotAllowed"
    assert "spec.adapters[0].versions[1].artifact.uri" in error.message
    mine = _ad({"name": "bot", "versions": [{"name": "v1", "artifact": _artifact("v1"), "weight": 100}]})
    assert store_refs.bind_adapterdeployment(mine)[1] is None
