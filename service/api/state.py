"""What routes read from the application: the core (settings, registry, admission, threads,
data plane) the process shares between its protocols."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Request

from service.process import Core


def get_core(request: Request) -> Core:
    return request.app.state.core


ModelName = Annotated[
    str, Path(description="Model name: its folder in models/.", examples=["digits"])
]
ModelVersion = Annotated[str, Path(description="The bundle's version.", examples=["1"])]
