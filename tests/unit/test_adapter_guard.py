"""A trainer's report is untrusted input, and deletion must not hurt others: an artifact is recorded only at the
version folder the FineTuneJob's spec determines and only when its manifest's lineage names this FineTuneJob's
UID; deletion waits while an AdapterDeployment references the adapter (by fineTuneJobRef or by URI) and gives up
once its bound has passed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lorafleet.config import OperatorSettings
from lorafleet.contracts.trainer import TrainerReport
from lorafleet.controllers import artifacts
from lorafleet.controllers import finetunejob as ftj_controller
from lorafleet.resources import adapter_guard as guard
from lorafleet.resources import finetunejob as ftj_res
from lorafleet.resources.conditions import Reason, get_condition
from lorafleet.resources.status import ArtifactCheck, FineTuneJobObserved, finetunejob_status, status_dict
from lorafleet.resources.status.finetunejob import deletion_blocked
from tests.unit import objects

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
SETTINGS = OperatorSettings(store_endpoint="http://minio:9000", store_uri="s3://lorafleet/")
EXPECTED = "s3://lorafleet/ml/adapters/support-bot/v1"  # <store uri>/<namespace>/adapters/...
UID = "uid-support-0000-0000"  # objects.fine_tune_job's
DIGEST = "sha256:" + "ab" * 32


def _ftj() -> ftj_res.FineTuneJobObject:
    return objects.as_fine_tune_job(objects.fine_tune_job())


def test_the_expected_uri_is_where_the_trainer_config_publishes() -> None:
    ftj = _ftj()
    assert ftj_res.output_target(ftj, SETTINGS).adapter_uri == EXPECTED
    config = ftj_res.trainer_config(ftj, "tiny-llama", objects.as_base_model(objects.base_model()).spec, SETTINGS)
    assert config.output.adapter_uri == EXPECTED
    assert config.job.uid == UID  # the trainer writes it into its lineage (hyperparameters.job.uid)


@pytest.mark.parametrize(
    ("claimed", "accepted"),
    [
        (EXPECTED, True),
        (EXPECTED + "/", True),
        ("s3://lorafleet/team-b/adapters/support-bot/v1", False),  # another team's adapter
        ("s3://lorafleet/ml/adapters/support-bot/v2", False),  # another version
        ("s3://models/llama/main", False),  # a shared base model
    ],
)
def test_only_the_spec_s_version_folder_is_acceptable(claimed: str, accepted: bool) -> None:
    problem = guard.uri_problem(claimed, EXPECTED)
    assert (problem is None) == accepted
    if problem is not None:
        assert problem[0] == "ArtifactRejected" and claimed in problem[1] and EXPECTED in problem[1]


def test_lineage_must_name_this_job_s_uid() -> None:
    assert guard.lineage_uid({"job": {"namespace": "ml", "name": "support", "uid": UID}}) == UID
    assert guard.lineage_uid({"job": "x"}) is None and guard.lineage_uid({}) is None
    assert guard.lineage_problem(EXPECTED, UID, UID) is None
    other = guard.lineage_problem(EXPECTED, UID, "uid-other")
    assert other is not None and "uid-other" in other[1] and UID in other[1]
    missing = guard.lineage_problem(EXPECTED, UID, None)
    assert missing is not None and "no FineTuneJob UID" in missing[1]


def _ad(name: str, namespace: str = "ml", deleting: bool = False, **adapter: object) -> dict[str, object]:
    meta: dict[str, object] = {"name": name, "namespace": namespace}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-22T11:00:00Z"
    return {"metadata": meta, "spec": {"adapters": [{"name": "a", **adapter}]}}


def test_referencing_deployments_by_ref_or_by_uri() -> None:
    deployments = [
        _ad("by-ref", fineTuneJobRef={"name": "support"}),
        _ad("by-uri", artifact={"uri": EXPECTED + "/", "digest": DIGEST}),
        _ad("other-job", fineTuneJobRef={"name": "other"}),
        _ad("other-uri", artifact={"uri": "s3://lorafleet/ml/adapters/support-bot/v2"}),
        _ad("same-name-elsewhere", namespace="team-b", fineTuneJobRef={"name": "support"}),  # not this job
        _ad("uri-elsewhere", namespace="team-b", artifact={"uri": EXPECTED}),
        _ad("going", deleting=True, fineTuneJobRef={"name": "support"}),
    ]
    users = guard.referencing_deployments("ml", "support", [EXPECTED], deployments)
    assert users == ["by-ref", "by-uri", "team-b/uri-elsewhere"]
    assert guard.referencing_deployments("ml", "support", [EXPECTED], []) == []


def test_deletion_gives_up_after_its_bound() -> None:
    deadline = guard.deletion_deadline("2026-11-22T11:00:00Z", NOW, 3600)
    assert deadline == datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    assert guard.gives_up(NOW, deadline)
    assert not guard.gives_up(NOW - timedelta(seconds=1), deadline)
    # Unknown or unreadable: counted from now, never "already expired".
    assert guard.deletion_deadline(None, NOW, 60) == NOW + timedelta(seconds=60)
    assert guard.deletion_deadline("yesterday", NOW, 60) == NOW + timedelta(seconds=60)
    problem = guard.in_use_problem(EXPECTED, ["a", "team-b/b"], deadline)
    assert problem[0] == "AdapterInUse" and "a, team-b/b" in problem[1] and "2026-11-22T12:00:00Z" in problem[1]


# -- the controller's use of them: verified_report and the status ----------------------------------------------


def _report(uri: str) -> TrainerReport:
    return TrainerReport.model_validate({"artifact": {"uri": uri, "digest": DIGEST, "sizeBytes": 64}})


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> dict[str, ArtifactCheck]:
    """What the store's manifests say, by URI; any other read fails the test."""
    manifests: dict[str, ArtifactCheck] = {}

    def check(_store: object, _ns: str, uri: str, _expected: str | None) -> ArtifactCheck:
        return manifests[uri]

    monkeypatch.setattr(ftj_controller, "SETTINGS", SETTINGS)
    monkeypatch.setattr(artifacts, "MANIFESTS", artifacts.ManifestCache(check))
    return manifests


def test_a_report_naming_another_uri_is_not_recorded(store: dict[str, ArtifactCheck]) -> None:
    report, problem = ftj_controller.verified_report(_ftj(), _report("s3://lorafleet/team-b/adapters/x/v1"))
    assert report is not None and report.artifact is None
    assert problem is not None and problem[0] == "ArtifactRejected"


def test_a_manifest_of_another_job_is_not_recorded(store: dict[str, ArtifactCheck]) -> None:
    store[EXPECTED] = ArtifactCheck(digest=DIGEST, size_bytes=64, job_uid="uid-someone-else")
    report, problem = ftj_controller.verified_report(_ftj(), _report(EXPECTED))
    assert report is not None and report.artifact is None
    assert problem is not None and "uid-someone-else" in problem[1]


def test_this_job_s_manifest_is_recorded_from_the_store(store: dict[str, ArtifactCheck]) -> None:
    store[EXPECTED] = ArtifactCheck(digest=DIGEST, size_bytes=99, job_uid=UID)
    report, problem = ftj_controller.verified_report(_ftj(), _report(EXPECTED + "/"))
    assert problem is None and report is not None and report.artifact is not None
    assert (report.artifact.uri, report.artifact.size_bytes) == (EXPECTED, 99)


def test_a_rejected_artifact_degrades_the_succeeded_job_until_one_is_recorded() -> None:
    ftj_body = objects.fine_tune_job()
    ftj_body["status"] = {"phase": "Succeeded", "conditions": []}
    ftj = objects.as_fine_tune_job(ftj_body)
    problem = (Reason.ARTIFACT_REJECTED, "the trainer reported the adapter at s3://elsewhere")
    st = status_dict(finetunejob_status(ftj, FineTuneJobObserved(None, artifact_problem=problem), NOW))
    degraded = get_condition(st["conditions"], "Degraded")
    assert degraded is not None and (degraded["status"], degraded["reason"]) == ("True", "ArtifactRejected")
    assert "artifact" not in st
    # The refusing pod is gone: still said.
    again = objects.as_fine_tune_job({**ftj_body, "status": st})
    st2 = status_dict(finetunejob_status(again, FineTuneJobObserved(None), NOW))
    assert get_condition(st2["conditions"], "Degraded") == degraded


def test_a_waiting_deletion_says_why_in_a_condition() -> None:
    ftj = _ftj()
    problem = guard.in_use_problem(EXPECTED, ["chat"], NOW)
    st = status_dict(deletion_blocked(ftj, problem, NOW))
    blocked = get_condition(st["conditions"], "DeletionBlocked")
    assert blocked is not None and blocked["status"] == "True" and blocked["reason"] == "AdapterInUse"
    assert "chat" in blocked["message"]
