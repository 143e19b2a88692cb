"""A large V2 JSON inference request read with simdjson: each input's `data` array of numbers
becomes one float64 array straight from the JSON text, never a list of Python floats.

Why not pydantic alone: it builds a Python float per element, then numpy reads them back: for a
3x128x128 input (1 MB of JSON) 2.8 ms of parse and 1.4 ms of list -> array, about half the
server's CPU for the request; simdjson reads the numbers into one buffer in about 1.5 ms
(measured on one core). Only the numbers skip pydantic: the rest of the request (names, shapes,
datatypes, parameters, outputs) is validated by the same `InferenceRequest` from the same JSON
text with each `data` array emptied, and the arrays are put in after.

`data` may be flat or nested as the data plane accepts it (service/tensors.py: the shape's
leading dimensions, the rest flattened in the innermost lists); simdjson's buffer flattens any
nesting, so the nesting is checked here: every list's length along the way, and the body's `[`
counted against the lists read, so that no list hides where a number should be (a count that
holds only when no string in the request has a `[`).

`read` answers only where both readers agree; it returns None for a body it leaves to the
pydantic path (service/v2codec.py), whose answer (the values, or the error message) is then the
one the client gets, exactly as before:
- a body simdjson refuses (malformed JSON, a lone surrogate, a number beyond float64's range,
  an integer beyond 64 bits), or one pydantic's validation of the emptied request refuses;
- a `data` that holds anything but numbers (booleans, nulls, strings), or is nested otherwise
  (ragged lists, a list among numbers, a nesting the shape does not allow, an empty list), or
  a request with a `[` inside a string;
- a duplicate key in the request or in an input (pydantic keeps the last, simdjson's lookup the
  first);
- a number of magnitude 2**53 or more: above it an integer's float64 is rounded, and numpy
  casts an all-integer list to float32 from int64 in one rounding, not two.
Both readers round each decimal to the nearest float64 (tests/service/test_json_tensors.py
compares them bit for bit), so a request read here runs on the very same input.
"""

from __future__ import annotations

import json
import math

import numpy as np
import simdjson
from pydantic import ValidationError

from service.schemas import InferenceRequest

READ_FROM = 16 * 1024  # bytes: below about 8 KiB pydantic alone is faster (measured)
EXACT_BELOW = 2.0**53  # every integer under it is exact in float64
MAX_KEYS = 64  # an object with more (a request has 4 fields, an input 5) goes to pydantic
MAX_INPUTS = 64  # a request with more inputs (a model here takes one) goes to pydantic
MAX_LISTS = 65_536  # nested `data` with more lists (checked one by one here) goes to pydantic


def read(body: bytes) -> InferenceRequest | None:
    """The request with each input's `data` a float64 array, or None: the pydantic path
    decides (see the module's docstring for when)."""
    try:
        document = simdjson.Parser().parse(body)
    except (ValueError, TypeError, RuntimeError):  # simdjson's errors: the pydantic path words them
        return None
    skeleton, arrays, nested = _skeleton(document)
    if skeleton is None or not _brackets_match(body, skeleton, nested):
        return None
    try:
        request = InferenceRequest.model_validate_json(json.dumps(skeleton))
    except ValidationError:
        return None
    for index, values in arrays.items():
        request.inputs[index].data = values  # type: ignore[assignment]  # read as numbers
    return request


def _skeleton(document: object) -> tuple[dict | None, dict[int, np.ndarray], int]:
    """The request as plain Python with each input's `data` emptied, those arrays by input
    index, and how many lists they hold besides themselves; (None, {}, 0) when any of them is
    not numbers nested as its shape allows (or the request is not an object with an `inputs`
    array of objects)."""
    nothing: tuple[None, dict, int] = (None, {}, 0)
    top = _items(document)
    if top is None:
        return nothing
    tensors = top.get("inputs")
    if not isinstance(tensors, simdjson.Array) or len(tensors) > MAX_INPUTS:
        return nothing
    skeleton = {key: _plain(value) for key, value in top.items() if key != "inputs"}
    inputs, arrays, nested = [], {}, 0
    for index, tensor in enumerate(tensors):
        fields = _items(tensor)
        if fields is None:
            return nothing
        data = fields.get("data")
        emptied = isinstance(data, simdjson.Array)
        plain = {k: [] if emptied and k == "data" else _plain(v) for k, v in fields.items()}
        if emptied:
            inner = _inner_lists(data, plain.get("shape"))
            values = None if inner is None else _numbers(data)
            if values is None:
                return nothing
            arrays[index], nested = values, nested + inner
        inputs.append(plain)
    skeleton["inputs"] = inputs
    return skeleton, arrays, nested


def _items(value: object) -> dict | None:
    """An object's members, values still simdjson's (`items()` would convert them, a `data`
    array into a Python list); None when it is no object, gives a key twice, or has more keys
    than a request could use (each lookup walks the object)."""
    if not isinstance(value, simdjson.Object):
        return None
    keys = list(value.keys())
    if len(keys) > MAX_KEYS or len(set(keys)) != len(keys):
        return None
    return {key: value[key] for key in keys}


def _plain(value: object) -> object:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _numbers(array: simdjson.Array) -> np.ndarray | None:
    """A `data` array's numbers as float64, nested lists flattened in order; None when it
    holds anything else, or a magnitude of 2**53 or more."""
    try:
        values = np.frombuffer(array.as_buffer(of_type="d"), dtype=np.float64)
    except (TypeError, ValueError, RuntimeError):  # a boolean, null, string or object in it
        return None
    if values.size and not np.abs(values).max() < EXACT_BELOW:
        return None
    return values


def _inner_lists(array: simdjson.Array, shape: object) -> int | None:
    """How many lists `data` holds inside itself when it is flat (0) or nested as the data
    plane accepts for `shape` (its leading dimensions, the rest flattened in the innermost
    lists, every list as long as its dimension); None otherwise. A list where a number should
    be is not seen here: `_brackets_match` finds it."""
    depth, first = 1, array
    while len(first) and isinstance(first[0], simdjson.Array):
        first, depth = first[0], depth + 1
    if depth == 1:
        return 0
    if not isinstance(shape, list) or not 1 < depth <= len(shape):
        return None
    if not all(type(d) is int and d >= 1 for d in shape):
        return None
    dims = [*shape[: depth - 1], math.prod(shape[depth - 1 :])]
    if math.prod(dims[:-1]) > MAX_LISTS:
        return None
    level, inner = [array], 0
    for size in dims[:-1]:  # every list of this level holds `size` lists
        below = []
        for lst in level:
            if len(lst) != size:
                return None
            for i in range(size):
                item = lst[i]
                if not isinstance(item, simdjson.Array):
                    return None
                below.append(item)
        inner += len(below)
        level = below
    return inner if all(len(lst) == dims[-1] for lst in level) else None


def _brackets_match(body: bytes, skeleton: dict, nested: int) -> bool:
    """The body holds exactly as many `[` as the skeleton has lists (each emptied `data` stands
    for its array) plus the `nested` lists read inside the `data` arrays: no `data` hides a list
    where a number should be (simdjson's buffer would have flattened it). Exact only when no
    string of the request (key or value) has a `[`: a request with one is left to pydantic."""
    expected, stack = nested, [skeleton]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if any("[" in key for key in value):
                return False
            stack.extend(value.values())
        elif isinstance(value, list):
            expected += 1
            stack.extend(value)
        elif isinstance(value, str) and "[" in value:
            return False
    found, at = 0, body.find(b"[")
    while at != -1:  # bytes.find is a memchr: much faster on a 1 MB body than bytes.count
        found += 1
        if found > expected:
            return False
        at = body.find(b"[", at + 1)
    return found == expected
