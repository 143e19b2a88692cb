"""What routes read from the application: the settings and the core (registry, admission,
data plane) the process shares between its protocols."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Request

from service.config import Settings
from service.core import Core


def get_core(request: Request) -> Core:
    return request.app.state.core


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


ModelName = Annotated[
    str, Path(description="Model name: its folder in models/.", examples=["digits"])
]
ModelVersion = Annotated[str, Path(description="The bundle's version.", examples=["1"])]
