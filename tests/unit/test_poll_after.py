"""What only the pods know and no watch shows is polled, and nothing else: an AdapterDeployment is looked at again
while an adapter is not settled or the deployment is not Ready; settled ones are left to their watch events. A
FineTuneJob is never polled: its trainer pod is watched (by label), whatever its phase."""

from __future__ import annotations

from lorafleet.api.adapterdeployment import AdapterDeploymentStatus, AdapterStatus
from lorafleet.config import OperatorSettings
from lorafleet.controllers import adapterdeployment, finetunejob, triggers
from lorafleet.resources import finetunejob as ftj_res
from tests.unit import objects

SETTINGS = OperatorSettings(store_endpoint="https://minio.storage.svc:9000", store_uri="s3://lorafleet")


def _ad(phase: str, *states: str) -> AdapterDeploymentStatus:
    adapters = [AdapterStatus(name=f"a{i}", state=s) for i, s in enumerate(states)]  # type: ignore[arg-type]
    return AdapterDeploymentStatus(phase=phase, adapters=adapters)  # type: ignore[arg-type]


def test_an_adapter_still_loading_is_polled() -> None:
    poll = adapterdeployment.ADAPTERS_POLL_SECONDS
    assert adapterdeployment.poll_after(_ad("Progressing", "Loaded", "Loading")) == poll
    assert adapterdeployment.poll_after(_ad("Ready", "Loaded", "Pending")) == poll


def test_a_settled_deployment_is_not_polled() -> None:
    assert adapterdeployment.poll_after(_ad("Ready", "Loaded", "Loaded")) is None
    assert adapterdeployment.poll_after(_ad("Ready", "Loaded", "Failed")) is None
    assert adapterdeployment.poll_after(_ad("Failed")) is None


def test_a_finetunejob_is_never_polled_its_trainer_pod_is_watched() -> None:
    assert finetunejob.RECONCILER.poll_after(finetunejob.FineTuneJobStatus(phase="Running")) is None
    ftj = objects.fine_tune_job()
    bm = objects.as_base_model(objects.ready(objects.base_model()))
    children = ftj_res.desired_children(objects.as_fine_tune_job(ftj), bm, SETTINGS)
    job = next(c for c in children if c["kind"] == "Job")
    labels = job["spec"]["template"]["metadata"]["labels"]
    # What the pod cache selects (the managed-by label) and what routes a pod's change to its FineTuneJob.
    assert labels["app.kubernetes.io/managed-by"] == "lorafleet"
    assert dict(triggers.owners("Pod", {"metadata": {"labels": labels}})) == {"FineTuneJob": ftj["metadata"]["name"]}
