"""MLServer with a custom runtime serving the folded ONNX model.

`OnnxRuntime` is the custom runtime MLServer's guide has a user write: `load` opens an
onnxruntime session, `predict` decodes the V2 input with NumpyCodec and encodes the logits.
`main` writes settings.json and model-settings.json into a work folder and runs `mlserver
start` on it: REST, gRPC and the metrics endpoint all on 127.0.0.1; `--parallel-workers` 0
runs inference in the server process, N > 0 in N worker processes (one onnxruntime intra-op
thread each, a share of the cores). MLServer 1.7.1's parallel workers need uvloop < 0.22
(scripts/install_peers.sh pins it). Ready when GET /v2/models/<name>/ready answers 200
(/v2/health/ready answers before the model is loaded).
Runs in its own virtualenv (bench/.peers/mlserver); the runtime is imported by MLServer as
`mlserver_server.OnnxRuntime` (this folder on PYTHONPATH, set by `main`).
Run: `bench/.peers/mlserver/bin/python bench/peers/mlserver_server.py --model-dir models/digits
--work DIR --http-port N --grpc-port M --metrics-port K --parallel-workers 0`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

HOST = "127.0.0.1"


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        threads = (self.settings.parameters.extra or {}).get("threads")
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(
            self.settings.parameters.uri, options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        logits = self.session.run(None, {self.input_name: x})[0]
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(self.output_name, logits)],
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--parallel-workers", type=int, default=0)
    args = parser.parse_args()
    manifest = json.loads((args.model_dir / "bundle.json").read_text())
    model = (args.model_dir / manifest["files"]["folded"]["path"]).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    settings = {
        "host": HOST,
        "http_port": args.http_port,
        "grpc_port": args.grpc_port,
        "metrics_port": args.metrics_port,
        "parallel_workers": args.parallel_workers,
        "metrics_dir": str(args.work / "metrics"),
        "environments_dir": str(args.work / "envs"),
        "debug": False,
    }
    (args.work / "settings.json").write_text(json.dumps(settings))
    extra = {"threads": 1} if args.parallel_workers > 0 else {}
    model_settings = {
        "name": manifest["name"],
        "implementation": "mlserver_server.OnnxRuntime",
        "parameters": {"uri": str(model), "extra": extra},
    }
    (args.work / "model-settings.json").write_text(json.dumps(model_settings))
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH", "")) if p
    )
    mlserver = str(Path(sys.executable).parent / "mlserver")
    os.execv(mlserver, [mlserver, "start", str(args.work)])


if __name__ == "__main__":
    main()
