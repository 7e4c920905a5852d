"""Compatibility checks run before an adapter is handed to vLLM. Pure functions; torch-free.

Two stages, so that an incompatible adapter is refused as early and as cheaply as possible:

* ``check_manifest``: from the stored manifest alone, before any byte of the adapter is downloaded: the pinned
  digest, the base model it was trained on, and the file formats (pickle refused, safetensors required).
* ``check_adapter_config``: from the downloaded ``adapter_config.json``: a plain LoRA, rank <= maxLoraRank, target
  modules the engine can serve.

vLLM checks the same things again when it loads the adapter; ``classify_engine_error`` maps its messages back to
the same reasons, so the reason does not depend on which side noticed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.contracts.serving import AdapterReason, DesiredAdapterSet
from lorafleet.serving.families import FAMILIES

# The adapter reasons are part of the sidecar's state contract (lorafleet.contracts.serving.AdapterReason).
Reason = AdapterReason


# Refusals that depend only on the (immutable) adapter version and the deployment's settings: retrying cannot
# help until the desired set changes.
PERMANENT = frozenset(
    {
        Reason.RANK_EXCEEDS_MAX,
        Reason.BASE_MODEL_MISMATCH,
        Reason.UNSAFE_FORMAT,
        Reason.UNSUPPORTED_TARGET_MODULES,
        Reason.UNSUPPORTED_ADAPTER,
    }
)

# Files that are (or may be) Python pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Linear layers vLLM can put a LoRA on, per BaseModel family (lorafleet.serving.families). The operator copies the
# entry of the BaseModel's family into DesiredAdapterSet.target_modules; "other" (or no entry) leaves the check to
# vLLM at load time.
SUPPORTED_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    f.name: f.target_modules for f in FAMILIES.values() if f.lora and f.target_modules
}


def supported_target_modules(family: str | None) -> list[str] | None:
    """What DesiredAdapterSet.target_modules should hold for a BaseModel family (None: leave it to vLLM)."""
    modules = SUPPORTED_TARGET_MODULES.get(family or "")
    return list(modules) if modules else None


@dataclass(frozen=True)
class Refusal:
    """Why an adapter is not served: a reason from ``Reason`` and a message that says what to do."""

    reason: str
    message: str

    @property
    def permanent(self) -> bool:
        return self.reason in PERMANENT


def _get(obj: Any, *keys: str) -> Any:
    """First of the keys present in a dict (manifests arrive camelCase, pydantic models snake_case)."""
    if not isinstance(obj, Mapping):
        return None
    for key in keys:
        if obj.get(key) is not None:
            return obj[key]
    return None


def check_digest(name: str, uri: str, pinned: str | None, actual: str) -> Refusal | None:
    if pinned is not None and pinned != actual:
        return Refusal(
            Reason.CHECKSUM_MISMATCH,
            f"adapter {name!r} at {uri} has digest {actual}, not the pinned {pinned}: the version was replaced or "
            "the pin is wrong; fix the digest in the AdapterDeployment, or push the adapter under a new version",
        )
    return None


def check_base_model(name: str, manifest: Mapping[str, Any], desired: DesiredAdapterSet) -> Refusal | None:
    """The adapter's lineage must name the deployment's base model. When both digests are known they decide
    (the same weights under another BaseModel name are fine); otherwise the names must match."""
    base = _get(manifest, "baseModel", "base_model")
    if not isinstance(base, Mapping) or not _get(base, "name"):
        return Refusal(
            Reason.BASE_MODEL_MISMATCH,
            f"adapter {name!r} records no base model in its manifest, so it cannot be checked against "
            f"{desired.base_model!r}; push it with --base-model (and --base-model-digest)",
        )
    trained_name = str(_get(base, "name"))
    trained_digest = _get(base, "digest")
    if trained_digest and desired.base_model_digest:
        if trained_digest == desired.base_model_digest:
            return None
        return Refusal(
            Reason.BASE_MODEL_MISMATCH,
            f"adapter {name!r} was trained on {trained_name!r} ({trained_digest}), but this deployment serves "
            f"{desired.base_model!r} ({desired.base_model_digest}); serve it on a deployment of its base model",
        )
    if trained_name != desired.base_model:
        return Refusal(
            Reason.BASE_MODEL_MISMATCH,
            f"adapter {name!r} was trained on {trained_name!r}, but this deployment serves {desired.base_model!r}; "
            "serve it on a deployment of its base model",
        )
    return None


def check_files(name: str, paths: Iterable[str]) -> Refusal | None:
    """Safetensors only: any pickle-format file is refused (even beside a safetensors file), before download."""
    paths = list(paths)
    pickles = sorted(p for p in paths if p.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        return Refusal(
            Reason.UNSAFE_FORMAT,
            f"adapter {name!r} contains pickle-format files ({', '.join(pickles)}), which can run code when "
            f"loaded; only {ADAPTER_WEIGHTS} is accepted: save it with save_pretrained(safe_serialization=True) "
            "and push it again",
        )
    missing = [p for p in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if p not in paths]
    if missing:
        return Refusal(
            Reason.UNSAFE_FORMAT if ADAPTER_WEIGHTS in missing else Reason.UNSUPPORTED_ADAPTER,
            f"adapter {name!r} lacks {', '.join(missing)}: a servable adapter is a peft folder with "
            f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}",
        )
    return None


def check_manifest(
    name: str, uri: str, pinned: str | None, manifest: Mapping[str, Any], digest: str, desired: DesiredAdapterSet
) -> Refusal | None:
    """Everything that can be checked before downloading: digest pin, base model, file formats."""
    files = _get(manifest, "files") or []
    paths = [str(_get(f, "path")) for f in files if isinstance(f, Mapping)]
    return (
        check_digest(name, uri, pinned, digest) or check_base_model(name, manifest, desired) or check_files(name, paths)
    )


def adapter_rank(config: Mapping[str, Any]) -> int | None:
    """The largest rank of a peft LoRA config (r and every rank_pattern entry)."""
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    ints = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
    return max(ints) if ints else None


def check_adapter_config(
    name: str, config: Mapping[str, Any], max_lora_rank: int, target_modules: Iterable[str] | None
) -> Refusal | None:
    """A plain LoRA, rank <= max_lora_rank, and (when the set names them) only supported target modules."""
    peft_type = str(config.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        return Refusal(Reason.UNSUPPORTED_ADAPTER, f"adapter {name!r} is a {peft_type} adapter; vLLM serves LoRA only")
    unsupported = [
        feature
        for feature, present in (
            ("DoRA (use_dora)", config.get("use_dora")),
            ("LoRA bias (lora_bias)", config.get("lora_bias")),
            ("layer_replication", config.get("layer_replication")),
            ("modules_to_save", [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]),
        )
        if present
    ]
    if unsupported:
        return Refusal(
            Reason.UNSUPPORTED_ADAPTER,
            f"adapter {name!r} uses {', '.join(unsupported)}, which vLLM cannot serve; train a plain LoRA",
        )
    rank = adapter_rank(config)
    if rank is None or rank < 1:
        return Refusal(Reason.UNSUPPORTED_ADAPTER, f"adapter {name!r}: {ADAPTER_CONFIG} has no valid rank r")
    if rank > max_lora_rank:
        return Refusal(
            Reason.RANK_EXCEEDS_MAX,
            f"adapter {name!r} has rank {rank}, above this deployment's maxLoraRank {max_lora_rank}; raise "
            "spec.engine.maxLoraRank (or leave it unset to size it from the adapters), or train with a smaller r",
        )
    if target_modules is not None:
        allowed = set(target_modules)
        wanted = config.get("target_modules")
        if isinstance(wanted, list):
            # As vLLM does (vllm/lora/lora_model.py), the layer is the name's last part: peft writes full module
            # paths (model.layers.0.mlp.down_proj) when it expands all-linear on some models.
            bad = sorted({str(m) for m in wanted if str(m).rsplit(".", 1)[-1] not in allowed})
            if bad:
                return Refusal(
                    Reason.UNSUPPORTED_TARGET_MODULES,
                    f"adapter {name!r} targets {', '.join(bad)}, which this base model's engine cannot put a LoRA "
                    f"on (supported: {', '.join(sorted(allowed))})",
                )
        # A regex string (peft allows one) cannot be checked here: vLLM checks the weights' names at load.
    return None


def read_adapter_config(name: str, folder: Path) -> tuple[dict[str, Any] | None, Refusal | None]:
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None, Refusal(Reason.UNSUPPORTED_ADAPTER, f"adapter {name!r} has no {ADAPTER_CONFIG}")
    except (OSError, ValueError) as e:
        return None, Refusal(Reason.UNSUPPORTED_ADAPTER, f"adapter {name!r}: {ADAPTER_CONFIG} is unreadable: {e}")
    if not isinstance(config, dict):
        return None, Refusal(Reason.UNSUPPORTED_ADAPTER, f"adapter {name!r}: {ADAPTER_CONFIG} is not an object")
    return config, None


_ENGINE_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"greater than max_lora_rank", re.I), Reason.RANK_EXCEEDS_MAX),
    (re.compile(r"expected\s+target modules", re.I), Reason.UNSUPPORTED_TARGET_MODULES),
    (re.compile(r"does not (yet )?support|only supports modules_to_save", re.I), Reason.UNSUPPORTED_ADAPTER),
    (re.compile(r"No adapter found|doesn't contain tensors", re.I), Reason.NOT_FOUND),
]


def classify_engine_error(message: str) -> str:
    """The reason for vLLM's refusal of a load, from its error message."""
    for pattern, reason in _ENGINE_PATTERNS:
        if pattern.search(message):
            return reason
    return Reason.LOAD_FAILED
