"""What every contract shares: the base model, message clipping and the reason pattern."""

from __future__ import annotations

import re
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from pydantic.alias_generators import to_camel

# Events' note and status messages are capped at 1 KiB; messages from the other side are cut to fit.
MAX_MESSAGE = 1024
# metav1.Condition's reason pattern: a reason from a pod that does not match is replaced.
REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")


def clip(message: str, limit: int = MAX_MESSAGE) -> str:
    """`message`, cut to at most `limit` characters (with an ellipsis when cut)."""
    return message if len(message) <= limit else message[: limit - 3] + "..."


def is_reason(value: object) -> bool:
    return isinstance(value, str) and REASON.match(value) is not None


class Contract(BaseModel):
    """Base of every contract: camelCase on the wire, unknown fields ignored, non-finite numbers refused
    (JSON cannot carry them and the API server refuses them in status)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", allow_inf_nan=False)

    def wire(self) -> dict[str, Any]:
        """The JSON object a writer sends: camelCase, None left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _none_on_error(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except ValidationError:
        return None


# A field that reads as None when the writer sent something invalid, instead of refusing the whole object:
# one bad number from a pod must not hide the rest of its report.
Lenient = WrapValidator(_none_on_error)

_M = TypeVar("_M", bound=BaseModel)


def lenient_copy(cls: type[_M], value: BaseModel) -> _M:
    """`value` (a CRD model, which refuses unknown fields) as its contract counterpart `cls` (which ignores them)."""
    return cls.model_validate(value.model_dump())
