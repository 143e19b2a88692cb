"""Which tensor of an imported ONNX model is the image, in what layout, and what it answers.

The server feeds one float32 image batch, (N, C, H, W) or (N, H, W, C), and reads one
(N, classes) float32 logits output. These functions find both in a user's graph, with the
flags the user gave, and refuse with one actionable sentence what does not fit.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import onnx

from bnfold.toolchain.load import (
    ModelImportError,
    dims,
    elem_type_name,
    has_shape,
    ort_session,
    real_inputs,
    run_zeros,
)

CHANNELS = (1, 3)  # gray or RGB: what the shared preprocessing makes from an image
CONTROL = ("Cc", "Cf", "Cs", "Co", "Cn")  # control, format (BOM, zero-width), unassigned, ...


@dataclass(frozen=True)
class ImageInput:
    name: str
    layout: str  # "NCHW" or "NHWC"
    channels: int
    height: int
    width: int
    batch: int | str | None  # as the graph declares it: fixed size, symbolic name, unknown

    @property
    def served_shape(self) -> list[int]:
        """The manifest's input shape: -1 marks the variable batch."""
        if self.layout == "NCHW":
            return [-1, self.channels, self.height, self.width]
        return [-1, self.height, self.width, self.channels]


def resolve_image_input(
    model: onnx.ModelProto,
    path: Path,
    input_name: str | None,
    layout: str | None,
    size: tuple[int, int] | None,
) -> ImageInput:
    """The image input: one float32 rank-4 tensor with 1 or 3 channels in a known layout."""
    vi = _pick_input(model, path, input_name)
    if elem_type_name(vi) != "float":
        raise ModelImportError(
            f"{path}: input {vi.name!r} is {elem_type_name(vi)}; bnfold serves float32 image "
            "tensors (N, C, H, W) or (N, H, W, C)"
        )
    shape = dims(vi) if has_shape(vi) else None
    if shape is None or len(shape) != 4:
        got = "no declared shape" if shape is None else f"shape {_show(shape)}"
        raise ModelImportError(
            f"{path}: input {vi.name!r} has {got}; bnfold serves rank-4 image tensors "
            "(N, C, H, W) or (N, H, W, C)"
        )
    layout = layout or _infer_layout(shape, vi.name, path)
    c, h, w = (shape[1], shape[2], shape[3]) if layout == "NCHW" else (shape[3], shape[1], shape[2])
    if c not in CHANNELS:
        raise ModelImportError(
            f"{path}: input {vi.name!r} {_show(shape)} read as {layout} has {c} channels; "
            "bnfold serves gray (1) or RGB (3) images (is --layout right?)"
        )
    h, w = _size(h, w, size, vi.name, path)
    return ImageInput(vi.name, layout, c, h, w, shape[0])


def _pick_input(model: onnx.ModelProto, path: Path, input_name: str | None):
    inputs = real_inputs(model)
    names = [i.name for i in inputs]
    if input_name is None:
        if len(inputs) != 1:
            raise ModelImportError(
                f"{path}: the model has {len(inputs)} inputs ({', '.join(names) or 'none'}); "
                f"name the image input with --input NAME{_constants_hint(inputs)}"
            )
        return inputs[0]
    if input_name not in names:
        raise ModelImportError(
            f"{path}: no input named {input_name!r}; the model's inputs are {', '.join(names)}"
        )
    others = [n for n in names if n != input_name]
    if others:
        raise ModelImportError(
            f"{path}: the model's other input(s) {', '.join(others)} would have no value: the "
            f"server feeds only the image {input_name!r}; export a model whose only input is "
            f"the image{_constants_hint([i for i in inputs if i.name in others])}"
        )
    return inputs[names.index(input_name)]


def _constants_hint(inputs: list[onnx.ValueInfoProto]) -> str:
    """Inputs of a fixed shape are often constants an exporter turned into inputs (Keras 3's
    Normalization layer exports its mean and variance so): say so, and what to do."""

    def small_and_fixed(vi: onnx.ValueInfoProto) -> bool:
        d = dims(vi)
        return d is not None and all(isinstance(v, int) for v in d) and math.prod(d) <= 4096

    fixed = [i.name for i in inputs if small_and_fixed(i)]
    if not fixed:
        return ""
    return (
        f" ({', '.join(fixed)}: a fixed shape and no value in the file, as when an exporter makes "
        "a constant an input, e.g. a Keras Normalization layer's mean and variance: make them "
        "keras.Variable before exporting, or export the model without that layer and give "
        "--mean/--std instead)"
    )


def _infer_layout(shape: list, name: str, path: Path) -> str:
    nchw, nhwc = shape[1] in CHANNELS, shape[3] in CHANNELS
    if nchw != nhwc:
        return "NCHW" if nchw else "NHWC"
    raise ModelImportError(
        f"{path}: cannot tell the layout of input {name!r} {_show(shape)}: pass "
        "--layout NCHW or --layout NHWC"
    )


def _size(h, w, size: tuple[int, int] | None, name: str, path: Path) -> tuple[int, int]:
    """Height and width: fixed by the graph, given by --size, and the two must agree."""
    fixed = isinstance(h, int) and isinstance(w, int)
    if size is None:
        if not fixed:
            raise ModelImportError(
                f"{path}: input {name!r} has a variable height/width: pass --size H W"
            )
        return h, w
    for got, want in ((h, size[0]), (w, size[1])):
        if isinstance(got, int) and got != want:
            raise ModelImportError(
                f"{path}: --size {size[0]}x{size[1]} differs from the fixed size {h}x{w} of "
                f"input {name!r}: leave --size out"
            )
    return size


def _show(shape: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def logits_output(
    model: onnx.ModelProto, path: Path, image: ImageInput, name: str | None = None
) -> tuple[str, int]:
    """The graph output `name` (default: the first), checked to answer (N, classes) float32
    for a batch of 2."""
    names = [o.name for o in model.graph.output]
    if name is not None and name not in names:
        raise ModelImportError(
            f"{path}: no output named {name!r}; the model's outputs are {', '.join(names)}"
        )
    index = names.index(name) if name is not None else 0
    out = model.graph.output[index]
    hint = " (choose the logits with --output NAME)" if len(names) > 1 else ""
    if elem_type_name(out) != "float":
        raise ModelImportError(
            f"{path}: output {out.name!r} is {elem_type_name(out)}; bnfold serves float32 "
            f"logits{hint}"
        )
    session = ort_session(model, path)
    shape = [2, *image.served_shape[1:]]
    try:
        result = run_zeros(session, image.name, shape)[index]
    except Exception as exc:  # onnxruntime's own error types
        from bnfold.toolchain.load import ort_message

        try:  # the batch is to blame only when one image runs
            run_zeros(session, image.name, [1, *shape[1:]])
        except Exception as exc1:
            raise ModelImportError(
                f"{path}: the model fails to run on one all-zero image {[1, *shape[1:]]}: "
                f"{ort_message(exc1)}"
            ) from None
        raise ModelImportError(
            f"{path}: the model fails on a batch of 2 images {shape}: {ort_message(exc)}; "
            "re-export it with a variable batch axis"
        ) from None
    if result.ndim != 2 or result.shape[0] != 2:
        raise ModelImportError(
            f"{path}: output {out.name!r} has shape {list(result.shape)} for 2 images; bnfold "
            f"serves classifiers answering (batch, classes) logits{hint}"
        )
    if result.shape[1] < 2:
        raise ModelImportError(
            f"{path}: output {out.name!r} has {result.shape[1]} value per image; bnfold serves "
            "classifiers with at least 2 classes"
        )
    return out.name, int(result.shape[1])


PROBABILITY_OPS = ("Softmax", "LogSoftmax", "Sigmoid")
SCORE_OPS = ("Softmax", "Sigmoid")  # their output is the score itself; softmax(LogSoftmax) = it


def final_op(model: onnx.ModelProto, served: str) -> str | None:
    """The op that makes the served output, looking through Identity nodes."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(served)
    while node is not None and node.op_type == "Identity":
        node = producers.get(node.input[0])
    return None if node is None else node.op_type


def output_notes(model: onnx.ModelProto, served: str) -> list[str]:
    """What a user should know about the outputs: others than the served one are dropped, and
    an output that already went through Softmax is probabilities, not logits."""
    notes = []
    others = [o.name for o in model.graph.output if o.name != served]
    if others:
        notes.append(
            f"the model has {len(others) + 1} outputs; the bundle serves {served!r} only "
            f"(not {', '.join(repr(o) for o in others)})"
        )
    op = final_op(model, served)
    if op in SCORE_OPS:
        notes.append(
            f"output {served!r} comes out of {op}: it holds probabilities, not logits; /v1 "
            "reports them as they are (bundle.json output.probabilities) and V2 infer returns "
            f"them; export the model without its final {op} to serve logits"
        )
    elif op in PROBABILITY_OPS:
        notes.append(
            f"output {served!r} comes out of {op}: log-probabilities; /v1 turns them into "
            "probabilities with a softmax, which is exact for them"
        )
    return notes


def check_classes(names: list[str] | None, count: int | None, n_out: int, output: str) -> list[str]:
    """Class names from --classes, else '0'..'N-1'; their count must be the output size."""
    if names is None:
        names = [str(i) for i in range(count if count is not None else n_out)]
    if len(names) != n_out:
        raise ModelImportError(
            f"{len(names)} class names given but output {output!r} has {n_out} values per "
            f"image: give exactly {n_out}"
        )
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ModelImportError(f"duplicate class names: {', '.join(dup)}")
    odd = [n for n in names if any(unicodedata.category(ch) in CONTROL for ch in n)]
    if odd:  # they would reach JSON answers, logs and the web page as they are
        raise ModelImportError(
            f"class name {odd[0]!r} contains control or invisible format characters; "
            "use printable text"
        )
    return names


def read_class_file(path: Path) -> list[str]:
    """One class name per line; blank lines, surrounding spaces and a UTF-8 byte order mark
    (what Windows editors write first) ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelImportError(f"--classes {path}: cannot read it ({exc})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]
