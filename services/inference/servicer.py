"""gRPC <-> domain translation for the inference service. Behaviour lives in the flow (flow/),
the model registry (models/registry.py), the endpoints (endpoints/) and the engines; this file only
converts messages and hands HTTP bodies to their endpoint."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.api import httpbody_pb2
from parley.inference.v1 import inference_pb2 as pb
from parley.inference.v1 import inference_pb2_grpc

from services.core import sampling, structured
from services.core.errors import InvalidArgument
from services.inference import metrics
from services.inference.endpoints import chat_completions, embeddings, messages, text_completions
from services.inference.engines import EmbeddingEngine
from services.inference.engines.base import Usage
from services.inference.flow.fitting import Fit
from services.inference.flow.metered import FINISH_REASONS, Completion, MeteredCompletions, Started
from services.inference.flow.service import GenerationService, Queued
from services.inference.models.hardware import Hardware, choose
from services.inference.models.registry import ModelRecord, ModelRegistry

STATES = {
    "available": pb.MODEL_STATE_AVAILABLE,
    "loading": pb.MODEL_STATE_LOADING,
    "ready": pb.MODEL_STATE_READY,
    "failed": pb.MODEL_STATE_FAILED,
}


def model_pb(record: ModelRecord) -> pb.Model:
    entry = record.entry
    fingerprint = record.fingerprint()
    created = int(fingerprint.rsplit("-", 1)[1]) if fingerprint else 0
    context = record.engine.context_length if record.engine else (entry.context_length or 0)
    state, error = record.status()
    dimensions = record.engine.dimensions if isinstance(record.engine, EmbeddingEngine) else 0
    template = getattr(record.engine, "chat_template", None)
    return pb.Model(
        id=entry.id, object="model", created=created, owned_by=entry.owned_by, state=STATES[state],
        engine=record.settings.engine if record.settings else entry.engine, source=entry.source,
        context_length=context, memory_mib=record.memory_mib, error=error, fingerprint=fingerprint,
        task=entry.task, dimensions=dimensions, chat_format=template.format.name if template is not None else "",
        type="model", display_name=entry.id,
        created_at=datetime.datetime.fromtimestamp(created, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def usage_pb(usage: Usage | None) -> pb.Usage:
    usage = usage or Usage()
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens, cached_prompt_tokens=usage.cached_prompt_tokens,
        time_to_first_token_ms=usage.time_to_first_token_ms, reasoning_tokens=usage.reasoning_tokens,
    )


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    """The generation's own deadline: a little before the call's, so that an answer cut by it still
    reaches the caller with its finish reason ("cancelled") and usage rather than DEADLINE_EXCEEDED."""
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, remaining - min(0.5, remaining / 10))


def _marker(context: grpc.aio.ServicerContext) -> chat_completions.Mark:
    """Sends the x-parley-cache value ("hit" or "miss") as initial metadata, which Envoy turns into
    that HTTP response header."""
    async def mark(value: str) -> None:
        await context.send_initial_metadata(((chat_completions.CACHE_HEADER, value),))

    return mark


WireCreate = Callable[[bytes, float | None, chat_completions.Mark], AsyncIterator[tuple[str, bytes]]]


async def _pass_through(create: WireCreate, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[httpbody_pb2.HttpBody]:
    """A wire format's answer to the request's body, as the HttpBody messages Envoy passes through
    verbatim (the first one's content type is the response's)."""
    async for content_type, data in create(request.http_body.data, _timeout(context), _marker(context)):
        yield httpbody_pb2.HttpBody(content_type=content_type, data=data)


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, registry: ModelRegistry, generation: GenerationService, hardware: Hardware,
                 cache_hit_ratio: Callable[[], Awaitable[float | None]] | None = None,
                 metered: MeteredCompletions | None = None,
                 embedder: embeddings.EmbeddingService | None = None) -> None:
        self.registry = registry
        self.generation = generation
        self.hardware = hardware
        # Rate limits, response cache, generation and usage: Generate and /v1/chat/completions.
        self.metered = metered or MeteredCompletions(generation, registry, cache=None)
        self.chat_completions = chat_completions.ChatCompletions(self.metered)
        # POST /v1/completions (legacy): the same flow on a raw prompt.
        self.text_completions = text_completions.TextCompletions(self.metered)
        # Anthropic's POST /v1/messages (and count_tokens): the same flow in Anthropic's shapes.
        self.messages = messages.Messages(self.metered)
        # Embed and POST /v1/embeddings: rate limits, batching engine, token usage.
        self.embedder = embedder or embeddings.EmbeddingService(registry, generation.settings, cache=None)
        # Asks the cache service; None when it cannot answer.
        self.cache_hit_ratio = cache_hit_ratio

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        records = sorted(self.registry.records.values(), key=lambda r: r.entry.id)
        data = [model_pb(r) for r in records]
        return pb.ListModelsResponse(object="list", data=data, has_more=False, first_id=data[0].id if data else "",
                                     last_id=data[-1].id if data else "")

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.Model:
        return model_pb(self.registry.get(request.id))

    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext) -> pb.Model:
        return model_pb(await self.registry.load(request.id))

    async def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext) -> pb.Model:
        return model_pb(await self.registry.unload(request.id))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        structured.check_count(len(request.messages))  # before 100,000 messages are converted
        fit = Fit(max(1, request.fit.keep_last), request.fit.reserve_tokens) if request.HasField("fit") else None
        completion = Completion(request.model, [structured.message_from_proto(m) for m in request.messages],
                                sampling.from_proto(request.sampling), prompt=request.prompt,
                                structure=structured.from_proto(request.structured), fit=fit,
                                report_queue=request.report_queue)
        async for item in self.metered.run(completion, _timeout(context)):
            if isinstance(item, Queued):
                yield pb.GenerateResponse(queued=pb.GenerateQueued(
                    position=item.position, estimated_wait_ms=min(round(item.wait_seconds * 1000), 2**31 - 1)))
                continue
            if isinstance(item, Started):
                yield pb.GenerateResponse(start=pb.GenerateStart(
                    model=item.model, model_fingerprint=item.fingerprint, cached=item.cached,
                    prompt_tokens=item.prompt_tokens, dropped_messages=item.dropped))
                continue
            calls = structured.calls_to_proto(item.tool_calls)
            if item.finish_reason is None:
                yield pb.GenerateResponse(text=item.text, reasoning=item.reasoning, tool_calls=calls)
            else:
                yield pb.GenerateResponse(text=item.text, reasoning=item.reasoning,
                                          finish_reason=FINISH_REASONS[item.finish_reason],
                                          usage=usage_pb(item.usage), tool_calls=calls)

    async def CountTokens(self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext) -> pb.CountTokensResponse:
        structured.check_count(len(request.messages))
        messages = [structured.message_from_proto(m) for m in request.messages]
        total, per_message, context_length = await self.metered.count_tokens(
            request.model, messages, structured.from_proto(request.structured))
        return pb.CountTokensResponse(total_tokens=total, message_tokens=per_message, context_length=context_length)

    async def CreateChatCompletion(
        self, request: pb.CreateChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        # Like OpenAI's own API, the body must be JSON whatever content type the client declared.
        async for body in _pass_through(self.chat_completions.create, request, context):
            yield body

    async def CreateCompletion(
        self, request: pb.CreateCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async for body in _pass_through(self.text_completions.create, request, context):
            yield body

    async def CreateMessage(
        self, request: pb.CreateMessageRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async for body in _pass_through(self.messages.create, request, context):
            yield body

    async def CountMessageTokens(self, request: pb.CountMessageTokensRequest,
                                 context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        return httpbody_pb2.HttpBody(content_type=chat_completions.JSON,
                                     data=await self.messages.count_tokens(request.http_body.data))

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        inputs: list[embeddings.Input] = []
        for i, given in enumerate(request.inputs):
            if given.text and given.tokens:
                raise InvalidArgument(f"inputs[{i}]: give text or tokens, not both")
            inputs.append(given.text or list(given.tokens))
        result = await self.embedder.embed(request.model, inputs, truncate=request.truncate,
                                           dimensions=request.dimensions or None, timeout=_timeout(context))
        return pb.EmbedResponse(
            model=result.model, prompt_tokens=result.prompt_tokens,
            embeddings=[pb.Embedding(values=row, tokens=n) for row, n in zip(result.vectors.tolist(), result.tokens)])

    async def CreateEmbedding(self, request: pb.CreateEmbeddingRequest,
                              context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        req = embeddings.parse_openai(request.http_body.data)
        result = await self.embedder.embed(req.model, req.inputs, truncate=req.truncate, dimensions=req.dimensions,
                                           timeout=_timeout(context))
        return httpbody_pb2.HttpBody(content_type=chat_completions.JSON,
                                     data=embeddings.render_openai(result, req.encoding_format))

    async def GetHardware(self, request: pb.GetHardwareRequest, context: grpc.aio.ServicerContext) -> pb.GetHardwareResponse:
        hw = self.hardware
        chosen = choose(hw, self.registry.settings, self.registry.get(self.registry.settings.default_model).entry.engine)
        return pb.GetHardwareResponse(
            detected=pb.HardwareInfo(
                physical_cores=hw.physical_cores, logical_cpus=hw.logical_cpus,
                total_memory_mib=hw.total_memory_mib, available_memory_mib=hw.available_memory_mib,
                cuda_devices=[pb.CudaDevice(index=d.index, name=d.name, total_memory_mib=d.total_memory_mib,
                                            free_memory_mib=d.free_memory_mib) for d in hw.cuda_devices],
                mps_available=hw.mps_available, llama_gpu_offload=hw.llama_gpu_offload,
                torch_available=hw.torch_available,
            ),
            chosen=pb.EngineSettings(
                engine=chosen.engine, device=chosen.device, threads=chosen.threads, gpu_layers=chosen.gpu_layers,
                dtype=chosen.dtype, quantization=chosen.quantization, context_length=chosen.context_length,
                parallel_slots=chosen.parallel_slots, reasons=chosen.reasons,
                kv_cache_tokens=chosen.kv_cache_tokens, resident_sequences=chosen.resident_sequences,
                batch_tokens=chosen.batch_tokens, host_kv_cache_mib=chosen.host_cache_mib,
            ),
        )

    async def GetMetricsSummary(
        self, request: pb.GetMetricsSummaryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetMetricsSummaryResponse:
        summary = metrics.RECENT.summary()
        ready = sorted((r for r in self.registry.records.values() if r.state == "ready"), key=lambda r: r.entry.id)
        engines = [r.engine for r in ready if r.engine is not None]
        hit_ratio = await self.cache_hit_ratio() if self.cache_hit_ratio is not None else None
        return pb.GetMetricsSummaryResponse(
            requests_total=summary.requests_total,
            time_to_first_token_p50_ms=summary.ttft_p50_seconds * 1000,
            time_to_first_token_p95_ms=summary.ttft_p95_seconds * 1000,
            tokens_per_second=summary.tokens_per_second,
            cache_hit_ratio=hit_ratio or 0.0,
            cache_available=hit_ratio is not None,
            loaded_models=[pb.LoadedModelSummary(id=r.entry.id, memory_mib=r.memory_mib) for r in ready],
            running_requests=sum(e.running for e in engines),
            queued_requests=sum(e.waiting for e in engines),
        )

