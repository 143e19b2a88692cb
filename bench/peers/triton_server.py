"""Triton Inference Server (the nvidia-pytriton wheel) serving the folded ONNX model.

Triton's own C++ HTTP and gRPC front ends and its dynamic batcher receive the V2 requests; the
batched tensors cross into this Python process (PyTriton's Python-backend proxy), where
onnxruntime runs them. `--instances` model instances (one inference callable each, one
onnxruntime intra-op thread each). Input and output names and shapes come from the bundle's
bundle.json (any bundle folder). Every endpoint binds 127.0.0.1; metrics are off.
Runs in its own virtualenv (bench/.peers/triton, scripts/install_peers.sh), imports nothing
from the project. Ready when GET /v2/models/<name>/ready answers 200 (Triton's
/v2/health/ready answers before the model is loaded).
Run: `bench/.peers/triton/bin/python bench/peers/triton_server.py --model-dir models/digits
--http-port N --grpc-port M`.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def infer_callable(model: Path, threads: int, input_name: str, output_name: str):
    """One model instance: its own onnxruntime session, the bundle's input and output names."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        (x,) = inputs.values()
        return {output_name: session.run([output_name], {input_name: x})[0]}

    return infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=0)
    args = parser.parse_args()
    manifest = json.loads((args.model_dir / "bundle.json").read_text())
    model = args.model_dir / manifest["files"]["folded"]["path"]
    input_name, output_name = manifest["input"]["name"], manifest["output"]["name"]
    item_shape = tuple(manifest["input"]["shape"][1:])  # without the batch dimension
    output_shape = tuple(manifest["output"]["shape"][1:])
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        allow_metrics=False,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=manifest["name"],
            infer_func=[
                infer_callable(model, 1, input_name, output_name) for _ in range(args.instances)
            ],
            inputs=[Tensor(name=input_name, dtype=np.float32, shape=item_shape)],
            outputs=[Tensor(name=output_name, dtype=np.float32, shape=output_shape)],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=False,
        )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        triton.run()  # starts serving; returns once the model is bound
        stop.wait()


if __name__ == "__main__":
    main()
