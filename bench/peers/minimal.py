"""A minimal FastAPI + onnxruntime handler without batching: what a user writes in an afternoon.

One session with onnxruntime's defaults, loaded at import; one plain `def` route, which FastAPI
runs in its thread pool; the same image preprocessing as bnfold; the top-1 label back.
Run: `BENCH_BUNDLE=models/digits python -m uvicorn bench.peers.minimal:app --port N`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, UploadFile

from bnfold.preprocess import PreprocessSpec, preprocess_bytes

BUNDLE = Path(os.environ.get("BENCH_BUNDLE", "models/digits"))
MANIFEST = json.loads((BUNDLE / "bundle.json").read_text())
SPEC = PreprocessSpec(**MANIFEST["input"]["preprocess"])
CLASSES = MANIFEST["classes"]
OPTIONS = ort.SessionOptions()
if os.environ.get("BENCH_THREADS"):  # under `uvicorn --workers N`: one share of the cores each
    OPTIONS.intra_op_num_threads = int(os.environ["BENCH_THREADS"])
session = ort.InferenceSession(
    str(BUNDLE / "folded.onnx"), OPTIONS, providers=["CPUExecutionProvider"]
)
app = FastAPI()


@app.get("/health")
def health() -> dict:
    return {"ok": True}


@app.post("/predict")
def predict(files: Annotated[list[UploadFile], File()]) -> dict:
    x = np.stack([preprocess_bytes(f.file.read(), SPEC) for f in files])  # (N, C, H, W)
    logits = session.run(None, {"input": x})[0]  # (N, classes)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    top = probs.argmax(axis=1)  # (N,)
    answers = [{"label": CLASSES[t], "probability": float(probs[n, t])} for n, t in enumerate(top)]
    return {"predictions": answers}
