"""`lorafleet models import DIR s3://.../models/<name>/<revision>`: a local Hugging Face model folder pushed as an
immutable model version (with its manifest), and the BaseModel to apply printed as YAML.

Weights must be safetensors: pickle files (.bin, .pt, .pth, .ckpt, .pkl, .pickle) run code when loaded and are
refused. The model's config.json fills the BaseModel's family, context length and dtype; the parameter count is
the sum of the tensor shapes in the safetensors headers (read without torch).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
# Config keys of the context length, in the order transformers' model types use them.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx", "max_seq_len")
_ARCH_SUFFIX = re.compile(r"(For(CausalLM|ConditionalGeneration|SequenceClassification)|LMHeadModel|Model)$")


class ImportRefused(ValueError):
    """The folder cannot be imported as it is; the message says why and what to do."""


@dataclass(frozen=True)
class ModelInfo:
    family: str
    parameter_count: int
    max_context_length: int | None
    dtype: str
    weight_files: list[str]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and ".lorafleet" not in p.relative_to(folder).parts)


def safetensors_parameters(path: Path) -> int:
    """Number of elements of every tensor in a safetensors file, from its JSON header."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ImportRefused(f"{path.name}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES:
            raise ImportRefused(f"{path.name}: not a safetensors file (header length {length})")
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise ImportRefused(f"{path.name}: not a safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise ImportRefused(f"{path.name}: not a safetensors file (header is not a JSON object)")
    total = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        shape = tensor.get("shape") if isinstance(tensor, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ImportRefused(f"{path.name}: tensor {name!r} has no valid shape in the header")
        total += math.prod(shape)
    return total


def family_of(config: dict[str, Any]) -> str:
    """BaseModel.spec.family from config.json: model_type, else the architecture's name, else 'other'."""
    from lorafleet.api.basemodel import ModelFamily

    families = set(get_args(ModelFamily))
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in families:
        return model_type
    by_plain_name = {f.replace("_", ""): f for f in families}
    for arch in config.get("architectures") or []:
        if isinstance(arch, str):
            plain = _ARCH_SUFFIX.sub("", arch).lower()
            if plain in by_plain_name:
                return str(by_plain_name[plain])
    return "other"


def context_length(config: dict[str, Any]) -> int | None:
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict):
            for key in CONTEXT_KEYS:
                value = cfg.get(key)
                if isinstance(value, int) and value > 0:
                    return value
    return None


def inspect_model(folder: Path) -> ModelInfo:
    """What the BaseModel says of the model in folder; ImportRefused for pickle weights, no safetensors, no config."""
    if not folder.is_dir():
        raise ImportRefused(f"{folder} is not a folder")
    files = _files(folder)
    rel = [p.relative_to(folder).as_posix() for p in files]
    pickles = [r for r in rel if r.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ImportRefused(
            f"{folder} holds pickle files ({', '.join(pickles)}): loading them can run arbitrary code, so lorafleet "
            "serves safetensors only. Convert the weights (transformers: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)) and remove the "
            "pickle files (training_args.bin and optimizer states are not needed for serving)"
        )
    weights = [p for p in files if p.suffix == ".safetensors"]
    if not weights:
        raise ImportRefused(f"{folder} has no *.safetensors weights: save the model with safe_serialization=True")
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise ImportRefused(f"{folder} has no config.json: import the folder save_pretrained wrote") from None
    except ValueError as e:
        raise ImportRefused(f"{folder}/config.json is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ImportRefused(f"{folder}/config.json is not a JSON object")
    dtype = config.get("torch_dtype") or config.get("dtype")
    return ModelInfo(
        family=family_of(config),
        parameter_count=sum(safetensors_parameters(p) for p in weights),
        max_context_length=context_length(config),
        dtype=dtype if dtype in ("float32", "float16", "bfloat16") else "auto",
        weight_files=[p.relative_to(folder).as_posix() for p in weights],
    )


def resource_name(model_name: str) -> str:
    """A DNS label from the model's name in the store (org/Model-7B -> org-model-7b)."""
    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")[:63].strip("-")
    return name or "model"


def base_model_yaml(name: str, namespace: str | None, uri: str, digest: str, info: ModelInfo) -> str:
    """The BaseModel to apply, validated against the API's own model."""
    import yaml

    from lorafleet import API_VERSION
    from lorafleet.api.basemodel import BaseModelSpec

    spec = {
        "source": {"uri": uri, "digest": digest},
        "family": info.family,
        "parameterCount": info.parameter_count or None,
        "maxContextLength": info.max_context_length,
        "dtype": info.dtype,
    }
    spec = BaseModelSpec.model_validate(spec).model_dump(by_alias=True, exclude_none=True, exclude_defaults=False)
    spec.pop("serving", None)  # empty defaults: the AdapterDeployment's own settings apply
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    obj = {"apiVersion": API_VERSION, "kind": "BaseModel", "metadata": metadata, "spec": spec}
    return str(yaml.safe_dump(obj, sort_keys=False))


def _import(args: argparse.Namespace) -> int:
    from lorafleet.storage import StoreError
    from lorafleet.storage.layout import VersionFolder, infer_layout
    from lorafleet.storage.settings import StoreSettings
    from lorafleet.storage.store import ArtifactStore

    try:
        info = inspect_model(args.src)
        folder = VersionFolder.parse(args.uri)
        inferred = infer_layout(folder)
        if inferred is None or inferred.kind != "model":
            raise ImportRefused(
                f"{folder.uri} is not a model version folder: use s3://<bucket>[/prefix]/models/<name>/<revision>"
            )
        print(
            f"{args.src}: family {info.family}, {info.parameter_count:,} parameters, context "
            f"{info.max_context_length or 'unknown'}, dtype {info.dtype}; pushing to {folder.uri}",
            file=sys.stderr,
        )
        store = ArtifactStore(StoreSettings.from_env())
        result = store.push(args.src, folder, kind="model", name=inferred.name, version=inferred.version)
    except ImportRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{'pushed' if result.created else 'already there'}: {folder.uri} {result.digest}", file=sys.stderr)
    name = args.name or resource_name(inferred.name)
    sys.stdout.write(base_model_yaml(name, args.namespace, folder.uri, result.digest, info))
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `models` to a parser's subcommands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "models", help="import a local Hugging Face model folder into the artifact store as a BaseModel"
    )
    sub = parser.add_subparsers(dest="models_command", required=True)
    p = sub.add_parser(
        "import",
        help="push a local model folder (safetensors) as a model version and print the BaseModel YAML to apply",
        description=__doc__.split("\n\n")[0] + " Store settings: LORAFLEET_STORE_* and AWS_* (docs/storage.md).",
    )
    p.add_argument("src", type=Path, help="the folder save_pretrained wrote (config.json, *.safetensors, tokenizer)")
    p.add_argument("uri", help="s3://<bucket>[/prefix]/models/<name>/<revision>")
    p.add_argument("--name", help="the BaseModel's name (default: from the model's name in the URI)")
    p.add_argument("--namespace", help="the BaseModel's namespace (default: none in the YAML)")
    p.set_defaults(func=_import)
    return parser
