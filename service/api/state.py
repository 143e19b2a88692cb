"""What routes read from the application: the settings and the model runtime."""

from __future__ import annotations

from fastapi import Request

from service.config import Settings
from service.runtime import ModelRuntime


def get_runtime(request: Request) -> ModelRuntime:
    return request.app.state.runtime


def get_settings(request: Request) -> Settings:
    return request.app.state.settings
