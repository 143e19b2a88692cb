"""Input tensors of the Open Inference Protocol -> the model's input array, for any wire format.

REST (service/v2codec.py, JSON or binary extension) and gRPC (service/grpc/codec.py, typed
contents or raw_input_contents) both decode a tensor into an `InputTensor`: name, datatype and
shape, its elements as raw little-endian bytes or as numbers. The data plane turns it into the
model's input with `input_array`; the checks and their messages live here once, so a client
gets the same answer for the same mistake over either protocol; only `where` (which field held
the elements) differs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bnfold.bundle import TensorSpec
from bnfold.errors import BadInput
from service.errors import shown, shown_list
from service.images import too_many_images  # the one message for too many rows

NUMPY_DTYPE = {"FP32": np.dtype("<f4")}  # what this server's models take and answer
MAX_DIM = 2**31 - 1  # numpy refuses larger dimensions even when another one is 0
MAX_RANK = 64  # numpy's most dimensions (np.MAXDIMS)
MAX_BYTES = 2**63 - 1  # numpy refuses a shape whose non-zero dimensions need more, even when empty


SHARED_MEMORY = "shared_memory_region"  # the shared memory extensions' tensor parameter


@dataclass
class InputTensor:
    """One input tensor as a request carried it: name, datatype, shape, and its elements as
    raw little-endian bytes or as numbers; `where` names the field that held them."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes | None = None
    values: object = None  # nested lists (JSON) or a repeated field (gRPC contents)
    where: str = "data"


def input_array(inputs: Sequence[InputTensor], spec: TensorSpec) -> np.ndarray:
    """The model's one input as an array of the declared shape (its fixed dimensions are the
    data plane's to check): names, datatype and element count checked."""
    tensor = inputs[0] if inputs else None
    datatype, shape = (tensor.datatype, tensor.shape) if tensor else ("", [])
    check_header([t.name for t in inputs], datatype, shape, spec)
    assert tensor is not None
    if tensor.raw is not None:
        return from_raw(tensor.name, datatype, shape, tensor.raw, tensor.where)
    return from_values(tensor.name, datatype, shape, tensor.values, tensor.where)


def refuse_shared_memory(kind: str, name: str) -> None:
    """The shared memory extensions are not served: a tensor that names a region is refused
    (an output answered in the body instead would leave the client reading its stale region)."""
    where = (
        "send it as data or binary tensor data"
        if kind == "input"
        else "leave its shared_memory_region out: outputs come back in the response"
    )
    raise BadInput(f"{kind} {shown(name)} names a shared memory region; this server has no "
                   f"shared memory extension: {where}")  # fmt: skip


def check_outputs_once(names: Sequence[str]) -> None:
    """Each output named at most once: a REST answer carries one copy per name, so 300,000
    copies of 'logits' in a 6 MB request grew the server past 11 GB and froze its event loop."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise BadInput(
                f"output {shown(name)} is requested more than once: name each output once"
            )
        seen.add(name)


def dims(shape: Sequence[int]) -> str:
    """A client's shape for an error message: '[1, 1, 8, 8]', a long one cut."""
    return shown_list(shape, str)


def shape_error(spec: TensorSpec, shape: Sequence[int]) -> str | None:
    """Why `shape` is not one the model takes (rank or a fixed dimension), None when it is;
    -1 in the spec's shape is the variable batch dimension."""
    expected = [d if d >= 0 else None for d in spec.shape]
    if len(shape) == len(expected) and all(
        e is None or e == d for e, d in zip(expected, shape, strict=True)
    ):
        return None
    want = [d if d >= 0 else "N" for d in spec.shape]
    return f"input {spec.name!r} must have shape {want}, got {dims(shape)}"


def _representable(shape: Sequence[int]) -> bool:
    """Whether numpy can hold an array of `shape` at all (an empty one included)."""
    return len(shape) <= MAX_RANK and math.prod(d for d in shape if d) * 8 <= MAX_BYTES


def check_header(
    names: Sequence[str], datatype: str, shape: Sequence[int], spec: TensorSpec
) -> int:
    """The request's inputs against the model's one input: names, datatype and shape.
    Returns the element count the shape implies."""
    if list(names) != [spec.name]:
        raise BadInput(
            f"this model takes one input named {spec.name!r}; the request has {shown_list(names)}"
        )
    if datatype != spec.datatype:
        given = datatype if datatype.isalnum() and len(datatype) <= 16 else shown(datatype)
        raise BadInput(
            f"input {spec.name!r} has datatype {given}; this model takes {spec.datatype}"
        )
    if any(d > MAX_DIM for d in shape):
        raise BadInput(f"input {spec.name!r}: shape {dims(shape)} has a dimension over {MAX_DIM}")
    if not _representable(shape):  # e.g. 100 dimensions, or [2**31-1]*3 + [0]: no array has it
        raise BadInput(
            shape_error(spec, shape) or f"input {spec.name!r}: shape {dims(shape)} is too large"
        )
    return math.prod(shape)


def check_declared(name: str, shape: Sequence[int], spec: TensorSpec | None, max_rows: int) -> int:
    """A tensor's declared shape against the request limits, before its elements are read:
    413 for more rows than BNFOLD_MAX_IMAGES_PER_REQUEST, 400 for a shape the model does not
    take (when `spec` is known). Returns the element count the shape implies."""
    if len(shape) > MAX_RANK or any(not isinstance(d, int) or d < 0 for d in shape):
        raise BadInput(f"input {shown(name)}: shape {dims(shape)} is not a list of sizes >= 0")
    if shape and shape[0] > max_rows:
        raise too_many_images(max_rows, shape[0])
    if spec is not None and (error := shape_error(spec, shape)):
        raise BadInput(error)
    return math.prod(shape)


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes, where: str) -> np.ndarray:
    """Raw little-endian elements -> float32 array of `shape`; `where` names the field that
    carried the bytes (its length is compared with what the shape needs)."""
    dtype = NUMPY_DTYPE[datatype]
    count = math.prod(shape)
    if len(raw) != count * dtype.itemsize:
        raise BadInput(
            f"input {name!r} has shape {dims(shape)} ({count} elements, "
            f"{count * dtype.itemsize} bytes of {datatype}) but {where} is {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=dtype).astype(np.float32).reshape(shape)


def check_count(name: str, shape: Sequence[int], got: int, where: str) -> None:
    """400 unless `where` holds as many elements as `shape` implies."""
    count = math.prod(shape)
    if got != count:
        raise BadInput(
            f"input {name!r} has shape {dims(shape)} ({count} elements) but its {where} holds "
            f"{got} elements"
        )


def from_values(name: str, datatype: str, shape: Sequence[int], values, where: str) -> np.ndarray:
    """Numbers (flat or nested lists, or a repeated field) -> float32 array of `shape`."""
    try:
        array = np.array(values)  # nested lists of numbers -> int64/float64
    except (ValueError, OverflowError):
        raise BadInput(
            f"input {name!r}: nested {where} lists must all have the same length"
        ) from None
    if array.dtype.kind not in "iuf":
        raise BadInput(f"input {name!r}: {where} must hold only numbers ({datatype})")
    _check_nesting(name, shape, array.shape, where)
    check_count(name, shape, array.size, where)
    with np.errstate(over="ignore"):  # beyond FP32 range becomes Inf, refused as non-finite
        return array.astype(np.float32).reshape(shape)


def _check_nesting(name: str, shape: Sequence[int], nested: tuple[int, ...], where: str) -> None:
    """Nested lists must follow the declared shape: flat, or nested as the shape's leading
    dimensions with the rest flattened in the innermost lists. Anything else (say an NHWC
    image under an NCHW shape, same element count) would be reshaped into the wrong pixels."""
    depth = len(nested)
    if depth <= 1 or (
        depth <= len(shape)
        and list(nested[:-1]) == list(shape[: depth - 1])
        and nested[-1] == math.prod(shape[depth - 1 :])
    ):
        return
    raise BadInput(
        f"input {name!r}: {where} is nested as {dims(nested)} but the shape is {dims(shape)}: "
        "nest it as the shape (row-major), or send it flat"
    )
