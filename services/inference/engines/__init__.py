"""Engines behind one interface (engines.base.Engine) and the factory that picks one."""

from __future__ import annotations

from services.inference.engines.base import Engine, EngineError
from services.inference.hardware import EngineSettings


def create_engine(model_id: str, path: str, settings: EngineSettings, params: dict) -> Engine:
    """The engine for one model. Imports are lazy: torch is only needed when a torch model loads."""
    if settings.engine == "llama.cpp":
        from services.inference.engines.llama import LlamaCppEngine

        return LlamaCppEngine(model_id, path, settings, params)
    if settings.engine == "torch":
        from services.inference.engines.torch_engine import TorchEngine

        return TorchEngine(model_id, path, settings, params)
    raise EngineError(f"unknown engine {settings.engine!r}")


__all__ = ["Engine", "EngineError", "create_engine"]
