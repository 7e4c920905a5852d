"""lorafleet: a Kubernetes operator for on-prem LoRA fine-tune-and-serve."""

__version__ = "0.1.0"
GROUP = "lorafleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
# The only finalizer lorafleet puts on objects: FineTuneJobs with deletionPolicy: Delete (their stored adapter).
FINALIZER = f"{GROUP}/finalizer"
