"""The HTTP stack's ceiling: FastAPI on uvicorn answering a constant, the body left unread.

Run: `python -m uvicorn bench.peers.bare:app --port N`. Nothing a model server does can be
faster than this on the same machine, so bnfold's requests/s are reported as a fraction of it.
"""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()
ANSWER = {"label": "0", "probability": 1.0}


@app.get("/health")
async def health() -> dict:
    return {"ok": True}


@app.post("/predict")
async def predict() -> dict:
    return ANSWER
