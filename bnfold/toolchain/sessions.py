"""onnxruntime sessions for the two variants, and probe sessions that expose layer outputs.

The folded model runs with full graph optimization (how it is served). The unfolded model runs
with graph optimization disabled: onnxruntime fuses Conv+BatchNormalization already at its basic
level, so only ORT_DISABLE_ALL makes BN really execute and keeps the comparison honest.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

GRAPH_OPT = {
    "folded": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "unfolded": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    # Full optimization fuses each DequantizeLinear -> op -> QuantizeLinear into an int8 kernel.
    "int8": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def resolve_providers(choice: str = "auto") -> list[str]:
    """'auto': CUDA when this onnxruntime offers it, else CPU; 'cuda' or 'cpu' forces one."""
    available = ort.get_available_providers()
    if choice == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    if choice == "cuda":
        if CUDA not in available:
            raise RuntimeError(
                f"execution provider 'cuda' requested but this onnxruntime offers only "
                f"{available}: install onnxruntime-gpu or use provider 'auto'/'cpu'"
            )
        return [CUDA, CPU]
    if choice == "cpu":
        return [CPU]
    raise ValueError(f"Invalid provider {choice!r}. Only 'auto', 'cpu' and 'cuda' are supported.")


def session_options(variant: str, threads: int = 0, spinning: bool = True) -> ort.SessionOptions:
    """`spinning=False`: idle intra-op threads sleep instead of spin-waiting for the next run
    (onnxruntime spins by default), which matters when other threads or processes need the
    cores."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = GRAPH_OPT[variant]
    opts.intra_op_num_threads = threads  # 0 = onnxruntime's default (one per core)
    opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 4  # fatal only: its errors reach us as exceptions, with text
    return opts


def make_session(
    model: Path | bytes,
    variant: str,
    providers: Sequence[str] = (CPU,),
    threads: int = 0,
    spinning: bool = True,
) -> ort.InferenceSession:
    source = str(model) if isinstance(model, Path) else model
    options = session_options(variant, threads, spinning)
    return ort.InferenceSession(source, sess_options=options, providers=list(providers))


def probe_model_bytes(model_path: Path, tensor_names: Sequence[str]) -> bytes:
    """The same ONNX graph with extra graph outputs for the named intermediate tensors.

    The file's bytes followed by a message holding only those outputs: protobuf merges a
    repeated message field, so onnxruntime parses one graph with the outputs appended, and the
    model is neither parsed nor serialized here (seconds for a 500 MB VGG). A name the graph
    does not compute fails the session, with onnxruntime's message naming it."""
    from onnx import GraphProto, ModelProto, TensorProto, helper

    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in tensor_names]
    suffix = ModelProto(graph=GraphProto(output=outputs)).SerializeToString()
    return Path(model_path).read_bytes() + suffix


def make_probe_session(
    model_path: Path, tensor_names: Sequence[str], providers: Sequence[str] = (CPU,)
) -> ort.InferenceSession:
    """Probe sessions run unoptimized in both variants so every named tensor exists as exported."""
    return make_session(probe_model_bytes(model_path, tensor_names), "unfolded", providers)


# Memory bounds, in float32 input values: the inputs held at once (64 MiB) and those fed to one
# run (16 MiB; its intermediate tensors grow with it). A 4096x4096 RGB model gets one input at a
# time instead of 64 (12.9 GB).
INPUT_BUDGET = 2**24
RUN_BUDGET = 2**22


def within_budget(per_input: int, wanted: int, budget: int = INPUT_BUDGET) -> int:
    """How many of `wanted` inputs of `per_input` values each fit in `budget` (at least 1)."""
    return max(1, min(wanted, budget // max(1, per_input)))


def run_logits(session, input_name: str, output: str, x: np.ndarray, batch: int = 256):
    """One output for x, in chunks of `batch` rows (fewer for large inputs, RUN_BUDGET); any
    session answering onnxruntime's `run` (an OpenVINO one too)."""
    batch = within_budget(x[0].size, batch, RUN_BUDGET) if len(x) else batch
    outs = [
        session.run([output], {input_name: x[i : i + batch]})[0] for i in range(0, len(x), batch)
    ]
    return np.concatenate(outs)


def run_session(session, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Logits for x (N, C, H, W): the session's first output for its first input."""
    name_in, name_out = session.get_inputs()[0].name, session.get_outputs()[0].name
    return run_logits(session, name_in, name_out, x, batch)
