"""One inference request and its answer, whatever protocol carried them.

REST (service/api/v2.py, service/api/v1.py) and gRPC (service/grpc/servicer.py) each decode
their wire format into an `InferRequest`, hand it to the data plane (service/dataplane.py)
with the model admission gave them, and encode the `InferResponse` it returns. The rules every
request follows whatever its protocol (the variant parameter, which outputs may be asked for)
live here, once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from bnfold.bundle import TensorSpec
from bnfold.errors import BadInput
from service.errors import shown
from service.images import Upload
from service.tensors import SHARED_MEMORY, InputTensor, check_outputs_once, refuse_shared_memory

DEFAULT_VARIANT = "folded"


@dataclass
class RequestedOutput:
    """An output the client asked for, with its parameters (REST's `binary_data` among them)."""

    name: str
    parameters: Mapping[str, object] = field(default_factory=dict)


@dataclass
class InferRequest:
    """What a client asked of a model: tensors (`inputs`) or images (`uploads`), the variant
    to run them on and the outputs to answer. `nbytes`: the size of the request as received,
    which decides whether turning its tensors into an array is worth a trip to a thread."""

    model: str
    version: str | None = None
    id: str | None = None
    variant: str = DEFAULT_VARIANT
    parameters: Mapping[str, object] = field(default_factory=dict)  # the request's, as sent
    outputs: list[RequestedOutput] = field(default_factory=list)
    inputs: list[InputTensor] = field(default_factory=list)
    uploads: list[Upload] | None = None
    nbytes: int = 0


@dataclass
class InferResponse:
    """The model's answer to an InferRequest: each requested output with its values."""

    model: str
    version: str | None
    id: str | None
    variant: str
    outputs: list[tuple[RequestedOutput, np.ndarray]]


def variant_of(parameters: Mapping[str, object] | None) -> str:
    """The request's `parameters.variant` (default folded); which variants exist is the
    model's to say (LoadedModel.check_variant, in the data plane)."""
    variant = (parameters or {}).get("variant", DEFAULT_VARIANT)
    if not isinstance(variant, str):
        raise BadInput(f"parameters.variant must be a string, got {variant!r}")
    return variant


def answered_outputs(
    requested: Sequence[RequestedOutput], spec: TensorSpec
) -> list[RequestedOutput]:
    """The outputs to answer: those asked for, each the model's one output and named once;
    the model's output when none are."""
    if not requested:
        return [RequestedOutput(spec.name)]
    check_outputs_once([out.name for out in requested])
    for out in requested:
        if SHARED_MEMORY in out.parameters:
            refuse_shared_memory("output", out.name)
        if out.name != spec.name:
            raise BadInput(
                f"unknown output {shown(out.name)}; this model has outputs [{spec.name!r}]"
            )
        if out.parameters.get("classification"):
            raise BadInput(
                "the classification extension is not supported; request the logits "
                "or use POST /v1/models/{model}/predict"
            )
    return list(requested)
