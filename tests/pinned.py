"""The reference at a pinned intra-op thread count, for tests that compare the server's logits
with onnxruntime's bit for bit.

onnxruntime may sum in another order with another number of intra-op threads, so a batch can
differ in the last bits between 1 and 2 threads (measured: the unfolded digits model, one row).
The server's default thread count depends on the machine (its usable cores, split between
workers), so tests pin both sides to THREADS: then equality is what the arithmetic guarantees
on any CPU and any core count.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from tests.conftest import GRAPH_OPT, DirectOnnx

THREADS = 1


def pinned_direct(bundle: Path, threads: int = THREADS) -> DirectOnnx:
    """DirectOnnx whose sessions run with `threads` intra-op threads."""
    reference = DirectOnnx(bundle)
    for variant, level in GRAPH_OPT.items():
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        opts.intra_op_num_threads = threads
        reference.sessions[variant] = ort.InferenceSession(
            str(bundle / f"{variant}.onnx"), opts, providers=["CPUExecutionProvider"]
        )
    return reference
