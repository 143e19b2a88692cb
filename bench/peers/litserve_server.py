"""LitServe serving the same folded ONNX model with its own dynamic batching on.

LitServe runs one HTTP server process and one inference worker process, and passes requests
between them; decode_request (the same preprocessing as bnfold) runs in the worker.
Run: `python -m bench.peers.litserve_server --bundle models/digits --port N`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import litserve as ls
import numpy as np
import onnxruntime as ort

from bnfold.preprocess import PreprocessSpec, preprocess_bytes


class OnnxClassifier(ls.LitAPI):
    """Multipart field 'files' (one image) -> top-1 label; batches stacked along N."""

    def __init__(self, bundle: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bundle = bundle

    def setup(self, device: str) -> None:
        manifest = json.loads((self.bundle / "bundle.json").read_text())
        self.spec = PreprocessSpec(**manifest["input"]["preprocess"])
        self.classes = manifest["classes"]
        path = str(self.bundle / "folded.onnx")
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def decode_request(self, request) -> np.ndarray:
        return preprocess_bytes(request["files"].file.read(), self.spec)  # (C, H, W)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)  # (N, C, H, W)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"input": x})[0]  # (N, classes)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, logits: np.ndarray) -> dict:
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = int(probs.argmax())
        return {"label": self.classes[top], "probability": float(probs[top])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout", type=float, default=0.002, help="seconds")
    args = parser.parse_args()
    api = OnnxClassifier(
        args.bundle, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
