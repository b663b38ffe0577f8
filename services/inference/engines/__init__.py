"""Engines behind one interface per task (engines.base.Engine for chat, engines.embedding.EmbeddingEngine
for embeddings) and the factory that picks one."""

from __future__ import annotations

from services.inference.engines.base import Engine, EngineError
from services.inference.engines.embedding import EmbeddingEngine
from services.inference.models.hardware import EngineSettings

CHAT, EMBEDDING = "chat", "embedding"
TASKS = (CHAT, EMBEDDING)


def engine_class(name: str, task: str = CHAT) -> type[Engine] | type[EmbeddingEngine]:
    """The engine class of a name and task. Imports are lazy: torch is only needed when a torch
    model loads."""
    if task == EMBEDDING:
        if name == "remote":
            from services.inference.engines.remote_embedding import RemoteEmbeddingEngine

            return RemoteEmbeddingEngine
        if name != "torch":
            raise EngineError(f"embedding models run on the torch engine or remote, not {name!r}")
        from services.inference.engines.torch_embedding import TorchEmbeddingEngine

        return TorchEmbeddingEngine
    if name == "llama.cpp":
        from services.inference.engines.llama import LlamaCppEngine

        return LlamaCppEngine
    if name == "torch":
        from services.inference.engines.torch_engine import TorchEngine

        return TorchEngine
    if name == "remote":
        from services.inference.engines.remote import RemoteEngine

        return RemoteEngine
    raise EngineError(f"unknown engine {name!r}")


def create_engine(model_id: str, path: str, settings: EngineSettings, params: dict,
                  task: str = CHAT) -> Engine | EmbeddingEngine:
    """The engine for one model."""
    return engine_class(settings.engine, task)(model_id, path, settings, params)


__all__ = ["CHAT", "EMBEDDING", "TASKS", "EmbeddingEngine", "Engine", "EngineError", "create_engine", "engine_class"]
