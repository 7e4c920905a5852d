"""A FineTuneJob's outcome under quality bars is the operator's own judgement of the evaluation in the adapter's
verified manifest: every bar reached is Succeeded; a missed bar is Failed BelowQualityBar and no evaluation is
Failed NotEvaluated, both with the adapter recorded (kept); nothing is decided before the manifest is read. A
pass flag or a number the pod invents beyond the contract changes nothing. status.usage charges what the Job
requested for as long as it ran, priced only from the operator's settings; no price, no cost.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from lorafleet.config import OperatorSettings, Pricing
from lorafleet.contracts.trainer import TrainerReport
from lorafleet.controllers import artifacts
from lorafleet.controllers import finetunejob as ftj_controller
from lorafleet.resources import finetunejob as ftj_res
from lorafleet.resources.conditions import Reason, get_condition
from lorafleet.resources.status import ArtifactCheck, FineTuneJobObserved, finetunejob_status, status_dict
from lorafleet.resources.stores import RenderError
from lorafleet.resources.usage import usage_status
from tests.unit import objects

Obj = dict[str, Any]
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
DIGEST = "sha256:" + "ab" * 32
URI = "s3://lorafleet/ml/adapters/support-bot/v1"
UID = "uid-support-0000-0000"  # objects.fine_tune_job's
START, END = "2026-11-22T11:00:00Z", "2026-11-22T11:10:00Z"  # 600 s
PRICING = Pricing.model_validate({"currency": "USD", "gpuHour": {"nvidia-h100": 3.6, "default": 1.8}, "cpuHour": 0.36})

EVALUATION = {
    "metrics": ["rougeL", "exactMatch"],
    "require": [{"metric": "rougeL", "minScore": 0.5, "minImprovement": 0.1}],
}


def _ftj(evaluation: Obj | None = EVALUATION, status: Obj | None = None, **spec: Any) -> Obj:
    body = objects.fine_tune_job(**spec)
    if evaluation is not None:
        body["spec"]["evaluation"] = copy.deepcopy(evaluation)
    if status is not None:
        body["status"] = status
    return body


def _job(succeeded: bool = True) -> Obj:
    kind = "Complete" if succeeded else "Failed"
    status: Obj = {
        "startTime": START,
        "conditions": [{"type": kind, "status": "True", "lastTransitionTime": END, "reason": "X", "message": "m"}],
    }
    if succeeded:
        status["completionTime"] = END
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "support-train"}, "status": status}


def _result(rouge: tuple[float, float] = (0.2, 0.8), exact: tuple[float, float] = (0.0, 0.5)) -> Obj:
    return {
        "version": 1,
        "examples": 40,
        "metrics": {
            "exactMatch": {"base": exact[0], "adapter": exact[1], "examples": 40},
            "rougeL": {"base": rouge[0], "adapter": rouge[1], "examples": 40},
        },
        "predictionsFile": "evaluation/predictions.jsonl",
    }


def _report(evaluation: Obj | None, verified: bool = True, **extra: Any) -> TrainerReport:
    """A report as the controller hands it to the status: with `verified`, its artifact and evaluation are the
    manifest's (controllers.finetunejob.verified_report)."""
    body: Obj = {"tokensTrained": 123456, **extra}
    if evaluation is not None:
        body["evaluation"] = evaluation
    if verified:
        body["artifact"] = {"uri": URI, "digest": DIGEST, "sizeBytes": 64}
    return TrainerReport.model_validate(body)


def _status(ftj: Obj, job: Obj | None, report: TrainerReport | None, **observed: Any) -> Obj:
    obs = FineTuneJobObserved(objects.basemodel_obj(objects.ready(objects.base_model())), job, report, **observed)
    return status_dict(finetunejob_status(objects.as_fine_tune_job(ftj), obs, NOW))


def _ready(status: Obj) -> tuple[str, str, str]:
    cond = get_condition(status["conditions"], "Ready")
    assert cond is not None
    return cond["status"], cond["reason"], cond.get("message", "")


# -- the outcome ------------------------------------------------------------------------------------------------


def test_every_bar_reached_succeeds_with_the_metrics_in_the_spec_order() -> None:
    st = _status(_ftj(), _job(), _report(_result()))
    assert st["phase"] == "Succeeded" and _ready(st)[:2] == ("True", "Succeeded")
    ev = st["evaluation"]
    assert ev["passed"] is True and "message" not in ev
    assert [m["name"] for m in ev["metrics"]] == ["rougeL", "exactMatch"]
    assert ev["metrics"][0] == {"name": "rougeL", "base": 0.2, "adapter": 0.8, "delta": 0.6, "examples": 40}
    assert ev["score"] == "rougeL 0.8 (+0.6)"
    assert ev["predictionsUri"] == URI + "/evaluation/predictions.jsonl"
    assert st["artifact"]["uri"] == URI


@pytest.mark.parametrize(
    ("rouge", "missed"),
    [
        ((0.2, 0.4), "rougeL 0.4 is not at least 0.5"),
        ((0.55, 0.6), "rougeL improves on the base by +0.05, less than 0.1"),
    ],
    ids=["below-min-score", "too-little-improvement"],
)
def test_a_missed_bar_fails_the_job_and_keeps_the_adapter(rouge: tuple[float, float], missed: str) -> None:
    st = _status(_ftj(), _job(), _report(_result(rouge=rouge)))
    status, reason, message = _ready(st)
    assert (st["phase"], status, reason) == ("Failed", "False", "BelowQualityBar")
    assert missed in message and URI in message
    degraded = get_condition(st["conditions"], "Degraded")
    assert degraded is not None and (degraded["status"], degraded["reason"]) == ("True", "BelowQualityBar")
    assert st["artifact"] == {"uri": URI, "digest": DIGEST, "sizeBytes": 64}
    assert st["evaluation"]["passed"] is False and missed in st["evaluation"]["message"]


def test_failed_below_the_bar_stays_failed_with_its_adapter_on_later_passes() -> None:
    first = _status(_ftj(), _job(), _report(_result(rouge=(0.2, 0.3))))
    again = _status(_ftj(status=first), _job(), None)
    assert again["phase"] == "Failed" and _ready(again)[1] == "BelowQualityBar"
    assert again["artifact"] == first["artifact"] and again["evaluation"] == first["evaluation"]
    assert again["usage"] == first["usage"]


def test_lower_is_better_metrics_are_judged_downwards() -> None:
    evaluation = {"metrics": ["evalLoss"], "require": [{"metric": "evalLoss", "minScore": 2.0, "minImprovement": 0.5}]}
    good = {"metrics": {"evalLoss": {"base": 3.0, "adapter": 1.5}}}
    worse = {"metrics": {"evalLoss": {"base": 3.0, "adapter": 2.8}}}
    assert _status(_ftj(evaluation), _job(), _report(good))["phase"] == "Succeeded"
    st = _status(_ftj(evaluation), _job(), _report(worse))
    assert st["phase"] == "Failed" and "evalLoss 2.8 is not at most 2" in _ready(st)[2]


def test_a_manifest_without_evaluation_fails_not_evaluated_with_the_adapter_kept() -> None:
    st = _status(_ftj(), _job(), _report(None))
    assert st["phase"] == "Failed" and _ready(st)[1] == "NotEvaluated"
    assert st["artifact"]["uri"] == URI and "evaluation" not in st


def test_a_missing_metric_misses_its_bar() -> None:
    result = {"metrics": {"exactMatch": {"base": 0.0, "adapter": 1.0}}}
    st = _status(_ftj(), _job(), _report(result))
    assert _ready(st)[1] == "BelowQualityBar" and "rougeL was not measured" in _ready(st)[2]


def test_the_pods_pass_flag_and_bad_numbers_change_nothing() -> None:
    """The contract has no 'passed'; a non-number reads as absent, and an absent score misses its bar."""
    result = {**_result(rouge=(0.2, 0.3)), "passed": True}
    assert _ready(_status(_ftj(), _job(), _report(result)))[1] == "BelowQualityBar"
    forged = _result()
    forged["metrics"]["rougeL"]["adapter"] = "0.99"
    st = _status(_ftj(), _job(), _report(forged))
    assert _ready(st)[1] == "BelowQualityBar" and "rougeL was not measured" in _ready(st)[2]


def test_nothing_is_decided_before_the_manifest_is_read() -> None:
    """The Job completed, the report claims a passing evaluation, but no artifact is verified yet."""
    st = _status(_ftj(), _job(), _report(_result(), verified=False))
    assert st["phase"] == "Running" and _ready(st)[1] == "VerifyingAdapter"
    progressing = get_condition(st["conditions"], "Progressing")
    assert progressing is not None and progressing["status"] == "True"
    assert not {"artifact", "evaluation", "usage", "completionTime"} & st.keys()
    # Read on a later pass: judged then.
    later = _status(_ftj(status=st), _job(), _report(_result()))
    assert later["phase"] == "Succeeded" and later["evaluation"]["passed"] is True


def test_a_refused_artifact_fails_a_gated_job_with_the_refusal() -> None:
    problem = (Reason.ARTIFACT_REJECTED, "the manifest names another FineTuneJob")
    st = _status(_ftj(), _job(), _report(_result(), verified=False), artifact_problem=problem)
    assert st["phase"] == "Failed" and _ready(st)[1] == "ArtifactRejected"
    assert "cannot be judged" in _ready(st)[2]
    assert "artifact" not in st and "evaluation" not in st  # unverified numbers are not shown as judged


def test_without_bars_the_job_succeeds_and_shows_the_reports_evaluation() -> None:
    st = _status(_ftj({"metrics": ["exactMatch"]}), _job(), _report(_result(exact=(0.1, 0.2)), verified=False))
    assert st["phase"] == "Succeeded"
    assert st["evaluation"]["passed"] is True and st["evaluation"]["score"] == "exactMatch 0.2 (+0.1)"
    assert "predictionsUri" not in st["evaluation"]  # no verified version folder to point into


def test_a_failed_job_records_no_artifact_even_if_its_report_names_one() -> None:
    st = _status(_ftj(), _job(succeeded=False), _report(_result()))
    assert st["phase"] == "Failed" and "artifact" not in st


@pytest.mark.parametrize("path", ["../../other/v1/x.jsonl", "/etc/passwd", "a//b", ".lorafleet/x"])
def test_a_predictions_path_outside_the_version_folder_is_not_shown(path: str) -> None:
    st = _status(_ftj(), _job(), _report({**_result(), "predictionsFile": path}))
    assert st["phase"] == "Succeeded" and "predictionsUri" not in st["evaluation"]


def test_without_spec_evaluation_the_status_has_no_evaluation() -> None:
    st = _status(_ftj(None), _job(), _report(None))
    assert st["phase"] == "Succeeded" and "evaluation" not in st


# -- the controller: the verified manifest's evaluation is the one judged ---------------------------------------


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> dict[str, ArtifactCheck]:
    """What the store's manifests say, by URI, read through the operator's manifest cache."""
    manifests: dict[str, ArtifactCheck] = {}

    def check(_store: object, _ns: str, uri: str, expected: str | None) -> ArtifactCheck:
        return manifests[uri]

    settings = OperatorSettings(store_endpoint="http://minio:9000", store_uri="s3://lorafleet/")
    monkeypatch.setattr(ftj_controller, "SETTINGS", settings)
    monkeypatch.setattr(artifacts, "MANIFESTS", artifacts.ManifestCache(check))
    return manifests


def test_the_manifests_evaluation_replaces_the_reports(store: dict[str, ArtifactCheck]) -> None:
    store[URI] = ArtifactCheck(digest=DIGEST, size_bytes=64, job_uid=UID, evaluation=_result(rouge=(0.2, 0.3)))
    claimed = _report(_result(rouge=(0.2, 0.99)))
    report, problem = ftj_controller.verified_report(objects.as_fine_tune_job(_ftj()), claimed)
    assert problem is None and report is not None and report.evaluation is not None
    assert report.evaluation.metrics["rougeL"].adapter == 0.3


def test_a_gated_job_reads_its_version_folder_without_a_report(store: dict[str, ArtifactCheck]) -> None:
    ftj = objects.as_fine_tune_job(_ftj())
    store[URI] = ArtifactCheck(digest=DIGEST, size_bytes=64, job_uid=UID, evaluation=_result())
    report, problem = ftj_controller.verified_report(ftj, None, look_in_store=True)
    assert problem is None and report is not None and report.artifact is not None
    assert report.artifact.uri == URI and report.evaluation is not None
    assert ftj_controller.verified_report(ftj, None) == (None, None)  # not looked for otherwise


def test_a_completed_gated_job_without_a_manifest_fails(store: dict[str, ArtifactCheck]) -> None:
    store[URI] = ArtifactCheck(problem=(Reason.MANIFEST_NOT_FOUND, f"no manifest at {URI}"))
    _, problem = ftj_controller.verified_report(objects.as_fine_tune_job(_ftj()), None, look_in_store=True)
    assert problem is not None and problem[0] == Reason.MANIFEST_NOT_FOUND
    st = _status(_ftj(), _job(), None, artifact_problem=problem)
    assert st["phase"] == "Failed" and _ready(st)[1] == "ManifestNotFound"


def test_the_trainer_config_carries_the_evaluation() -> None:
    settings = OperatorSettings(store_endpoint="http://minio:9000", store_uri="s3://lorafleet/")
    base = objects.as_base_model(objects.base_model()).spec

    def rendered(body: Obj) -> Obj:
        return ftj_res.trainer_config(objects.as_fine_tune_job(body), "tiny-llama", base, settings).render()

    evaluation = rendered(_ftj())["evaluation"]
    assert evaluation["metrics"] == ["rougeL", "exactMatch"]
    assert evaluation["require"] == [{"metric": "rougeL", "minScore": 0.5, "minImprovement": 0.1}]
    assert "evaluation" not in rendered(_ftj(None))  # configs without it render as before


def test_an_evaluation_file_in_another_namespaces_root_is_refused() -> None:
    """The trainer reads it with the platform's keys, like the datasets: never another team's artifacts."""
    settings = OperatorSettings(store_endpoint="http://minio:9000", store_uri="s3://lorafleet/")
    base = objects.as_base_model(objects.base_model()).spec
    theirs = _ftj({"uri": "s3://lorafleet/team-b/adapters/x/v1/evaluation/predictions.jsonl"})
    with pytest.raises(RenderError, match=r"spec\.evaluation\.uri") as refused:
        ftj_res.trainer_config(objects.as_fine_tune_job(theirs), "tiny-llama", base, settings)
    assert refused.value.reason == Reason.STORE_NOT_ALLOWED
    ours = _ftj({"uri": "s3://lorafleet/ml/data/held-out.jsonl"})
    assert ftj_res.trainer_config(objects.as_fine_tune_job(ours), "tiny-llama", base, settings).evaluation


def test_an_evaluation_file_on_a_claim_is_mounted() -> None:
    settings = OperatorSettings(store_endpoint="http://minio:9000", store_uri="s3://lorafleet/")
    body = _ftj({"uri": "pvc://held-out/support.jsonl"})
    children = ftj_res.desired_children(
        objects.as_fine_tune_job(body), objects.as_base_model(objects.ready(objects.base_model())), settings
    )
    job = next(c for c in children if c["kind"] == "Job")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]  # fmt: skip
    assert claims == ["held-out"]


# -- usage and cost ---------------------------------------------------------------------------------------------


def test_a_finished_gpu_job_is_charged_gpus_times_pods_times_wall() -> None:
    resources = {"nodes": 2, "gpusPerNode": 4, "nodeSelector": {"nvidia.com/gpu.product": "nvidia-h100"}}
    ftj = _ftj(None, resources=resources)
    st = _status(ftj, _job(), _report(None), pricing=PRICING)
    # 2 pods x 4 GPUs x 600 s = 4800 GPU-s = 1.333 GPU-hours at 3.6 = 4.80
    assert st["usage"] == {"wallSeconds": 600.0, "gpuSeconds": 4800.0, "tokensTrained": 123456,
                           "estimatedCost": "4.80 USD"}  # fmt: skip


def test_an_unpriced_gpu_type_takes_the_default_price_and_no_price_no_cost() -> None:
    resources = {"gpusPerNode": 1, "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}
    st = _status(_ftj(None, resources=resources), _job(), None, pricing=PRICING)
    assert st["usage"]["estimatedCost"] == "0.3000 USD"  # 600 GPU-s at 1.8 per hour
    assert "estimatedCost" not in _status(_ftj(None, resources=resources), _job(), None)["usage"]
    only_h100 = Pricing.model_validate({"gpuHour": {"nvidia-h100": 3.6}})
    assert "estimatedCost" not in _status(_ftj(None, resources=resources), _job(), None, pricing=only_h100)["usage"]


def test_a_cpu_job_is_charged_its_requested_cpus() -> None:
    st = _status(_ftj(None, resources={"gpusPerNode": 0, "cpu": "500m"}), _job(), None, pricing=PRICING)
    assert st["usage"] == {"wallSeconds": 600.0, "cpuSeconds": 300.0, "estimatedCost": "0.0300 USD"}
    unrequested = _status(_ftj(None, resources={"gpusPerNode": 0}), _job(), None, pricing=PRICING)
    assert unrequested["usage"] == {"wallSeconds": 600.0}  # nothing requested to charge


def test_a_failed_job_is_charged_until_it_was_marked_failed() -> None:
    st = _status(_ftj(None), _job(succeeded=False), None)
    assert st["phase"] == "Failed" and st["usage"]["gpuSeconds"] == 600.0


def test_no_usage_while_running_and_a_late_reports_tokens_are_added() -> None:
    running = {"startTime": START, "active": 1, "conditions": []}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "support-train"}, "status": running}
    assert "usage" not in _status(_ftj(None), job, None)
    first = _status(_ftj(None), _job(), None)
    assert "tokensTrained" not in first["usage"]
    later = _status(_ftj(None, status=first), _job(), _report(None))
    assert later["usage"]["tokensTrained"] == 123456


def test_untrusted_token_counts_are_dropped() -> None:
    resources = objects.as_fine_tune_job(_ftj(None)).spec.resources
    usage = usage_status(resources, START, END, -5, None)
    assert usage is not None and usage.tokens_trained is None
    assert usage_status(resources, START, None, 5, None) is None
    assert usage_status(resources, "yesterday", END, 5, None) is None


def test_prices_come_from_the_operators_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_PRICING", '{"currency": "EUR", "gpuHour": {"default": 2}, "cpuHour": 0.05}')
    pricing = OperatorSettings().pricing
    assert pricing is not None and (pricing.currency, pricing.gpu_price({}), pricing.cpu_hour) == ("EUR", 2, 0.05)
    for bad in ('{"gpuHour": {"a100": -1}}', '{"gpuHour": {"a100": "cheap"}}', '{"cpuHour": 1, "typo": 2}',
                '{"currency": "US DOLLARS"}'):  # fmt: skip
        monkeypatch.setenv("LORAFLEET_PRICING", bad)
        with pytest.raises(ValidationError, match="pricing"):
            OperatorSettings()
