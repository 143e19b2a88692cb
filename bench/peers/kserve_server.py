"""KServe's Python model server (`kserve.Model` + `ModelServer`) serving the folded ONNX model.

The model is what KServe's custom-model guide has a user write: `load` opens an onnxruntime
session, `predict` takes the V2 `InferRequest` and returns an `InferResponse`, over REST
(uvicorn, `--workers` processes) and gRPC (one grpc.aio server in the main process). The
response holds the outputs the request asks for, as binary data where it asks (the V2 binary
tensor extension), as KServe's own `kserve.utils.utils.get_predict_response` builds it.
Input and output names and shapes come from the bundle's model (any bundle folder). KServe
binds 0.0.0.0 (REST) and [::] (gRPC) with no option to change it: this script rewrites both to
127.0.0.1 before they bind. With more than one worker each process's onnxruntime gets one
intra-op thread (a share of the cores), as bnfold's workers do.
Runs in its own virtualenv (bench/.peers/kserve, scripts/install_peers.sh); settings come from
the environment because KServe parses the command line itself:
BENCH_MODEL_DIR, BENCH_HTTP_PORT, BENCH_GRPC_PORT, BENCH_WORKERS.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import grpc.aio
import numpy as np
import onnxruntime as ort
import uvicorn

HOST = "127.0.0.1"


def _loopback_only() -> None:
    """KServe hard-codes host="0.0.0.0" for uvicorn and "[::]:port" for gRPC."""
    config_init = uvicorn.Config.__init__

    def config_on_loopback(self, *args, **kwargs):
        kwargs["host"] = HOST
        config_init(self, *args, **kwargs)

    uvicorn.Config.__init__ = config_on_loopback
    add_port = grpc.aio._server.Server.add_insecure_port

    def port_on_loopback(self, address: str) -> int:
        return add_port(self, f"{HOST}:{address.rsplit(':', 1)[1]}")

    grpc.aio._server.Server.add_insecure_port = port_on_loopback


_loopback_only()

import kserve  # noqa: E402  (after the patch: kserve's modules bind uvicorn.Config by name)
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse  # noqa: E402


class OnnxModel(kserve.Model):
    """The folded ONNX model; the session is opened in every process that serves it."""

    def __init__(self, model_dir: Path, threads: int | None) -> None:
        manifest = json.loads((model_dir / "bundle.json").read_text())
        super().__init__(manifest["name"])
        self.path = model_dir / manifest["files"]["folded"]["path"]
        self.threads = threads
        self.session: ort.InferenceSession | None = None
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.ready = True
        return self.ready

    def __getstate__(self) -> dict:  # REST worker processes are spawned: no session pickled
        return {**self.__dict__, "session": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.load()

    def predict(
        self, payload: InferRequest, headers: dict | None = None, response_headers=None
    ) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        logits = self.session.run(None, {self.input_name: x})[0]
        binary = payload.use_binary_outputs
        out = InferOutput(name=self.output_name, shape=list(logits.shape), datatype="FP32")
        out.set_data_from_numpy(logits, binary_data=binary)
        return InferResponse(
            model_name=self.name,
            infer_outputs=[out],
            response_id=payload.id or str(uuid.uuid4()),
            use_binary_outputs=binary,
            requested_outputs=payload.request_outputs,
        )


def main() -> None:
    workers = int(os.environ.get("BENCH_WORKERS", "1"))
    model = OnnxModel(Path(os.environ["BENCH_MODEL_DIR"]), 1 if workers > 1 else None)
    kserve.ModelServer(
        http_port=int(os.environ["BENCH_HTTP_PORT"]),
        grpc_port=int(os.environ["BENCH_GRPC_PORT"]),
        workers=workers,
    ).start([model])


if __name__ == "__main__":
    main()
