"""What routes read from the application: the settings and the model runtime."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Request

from service.config import Settings
from service.runtime import ModelRuntime


def get_runtime(request: Request) -> ModelRuntime:
    return request.app.state.runtime


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


ModelName = Annotated[
    str, Path(description="Model name: its folder in models/.", examples=["digits"])
]
ModelVersion = Annotated[str, Path(description="The bundle's version.", examples=["1"])]
