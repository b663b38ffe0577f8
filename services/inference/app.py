"""Wires the inference service: settings, hardware probe, model registry, servicer."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from parley.inference.v1 import inference_pb2, inference_pb2_grpc

from services.auth import client as auth_client
from services.cache.client import CacheClient
from services.core import config
from services.core.config import CommonSettings
from services.core.errors import Unavailable
from services.core.server import Registration, ServiceSpec
from services.inference import metrics
from services.inference.endpoints.embeddings import EmbeddingService
from services.inference.flow.metered import MeteredCompletions
from services.inference.flow.service import GenerationService
from services.inference.models import hardware
from services.inference.models.registry import ModelRegistry
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceSettings

log = logging.getLogger("parley.inference")

# Model memory and the machine are the operator's business; listing models and generating are not.
REMOTE_RETRY_SECONDS = 3.0
ADMIN_METHODS = ("LoadModel", "UnloadModel", "GetHardware", "GetMetricsSummary")


async def preload(registry: ModelRegistry, model_id: str) -> None:
    """Loads the default model before health reports SERVING. A remote model waits for its upstream
    (vLLM takes minutes to start beside it), retrying every few seconds, instead of failing start-up."""
    while True:
        try:
            await registry.load(model_id)
            return
        except Unavailable as exc:
            if registry.get(model_id).entry.engine != "remote":
                raise
            log.warning("the default model's upstream does not answer yet; retrying",
                        extra={"fields": {"model": model_id, "error": exc.message}})
            await asyncio.sleep(REMOTE_RETRY_SECONDS)


async def build(common: CommonSettings, settings: InferenceSettings | None = None) -> ServiceSpec:
    settings = settings or config.load(InferenceSettings)
    if settings.disk_kv_cache_dir is None:  # conversations' KV state lives with the other services' data
        settings = dataclasses.replace(settings, disk_kv_cache_dir=common.data_dir / "kv")
    hw = hardware.probe()
    registry = ModelRegistry(settings, hw)
    generation = GenerationService(registry, settings)
    cache = CacheClient(common)  # rate limits and the response cache of every generation
    metered = MeteredCompletions(generation, registry, cache)
    embedder = EmbeddingService(registry, settings, cache)
    servicer = InferenceServicer(registry, generation, hw, cache.hit_ratio, metered=metered, embedder=embedder)
    metrics.REGISTRY_GAUGES.watch(registry.loaded)
    log.info("hardware", extra={"fields": {"cores": hw.physical_cores, "memory_mib": hw.total_memory_mib,
                                            "cuda": len(hw.cuda_devices), "budget_mib": registry.budget_mib}})

    async def ready() -> None:
        if settings.preload:
            await preload(registry, settings.default_model)
        registry.start_reaper()

    async def close() -> None:
        await registry.close()
        await metered.close()
        await embedder.close()
        await cache.close()

    name = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
    admin_only = {f"/{name}/{method}": ("admin",) for method in ADMIN_METHODS}
    return ServiceSpec(
        name="inference",
        registrations=[Registration(name, inference_pb2_grpc.add_InferenceServiceServicer_to_server, servicer)],
        ready=ready,
        close=close,
        interceptors=[auth_client.interceptor(common, roles=admin_only)],
    )

