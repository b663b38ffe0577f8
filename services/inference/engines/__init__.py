"""Engines behind one interface (engines.base.Engine) and the factory that picks one."""

from __future__ import annotations

from services.inference.engines.base import Engine, EngineError
from services.inference.hardware import EngineSettings


def engine_class(name: str) -> type[Engine]:
    """The engine class of a name. Imports are lazy: torch is only needed when a torch model loads."""
    if name == "llama.cpp":
        from services.inference.engines.llama import LlamaCppEngine

        return LlamaCppEngine
    if name == "torch":
        from services.inference.engines.torch_engine import TorchEngine

        return TorchEngine
    raise EngineError(f"unknown engine {name!r}")


def create_engine(model_id: str, path: str, settings: EngineSettings, params: dict) -> Engine:
    """The engine for one model."""
    return engine_class(settings.engine)(model_id, path, settings, params)


__all__ = ["Engine", "EngineError", "create_engine", "engine_class"]
