"""The torch engine streams a real model on CPU through the same Generate RPC as llama.cpp.

transformers loads the bundled GGUF (dequantized to float32): no hub download is involved."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import grpc
from parley.inference.v1 import inference_pb2 as pb
from parley.inference.v1 import inference_pb2_grpc

from services.core import config
from services.core.server import start_server
from services.inference.app import build
from services.inference.registry import BUNDLED
from services.inference.settings import InferenceSettings


async def test_torch_engine_streams_through_generate(tmp_path: Path) -> None:
    catalogue = tmp_path / "models.json"
    catalogue.write_text(json.dumps([BUNDLED, {**BUNDLED, "id": "smollm2-torch", "engine": "torch", "parallel_slots": 1}]))
    settings = config.load(InferenceSettings, {
        "PARLEY_MODELS_FILE": str(catalogue), "PARLEY_PRELOAD": "false", "PARLEY_CONTEXT_LENGTH": "1024",
    })
    spec = await build(config.load(config.CommonSettings, {}), settings)
    # This test is about the engine behind the RPC; credentials are tested with the whole stack.
    spec = dataclasses.replace(spec, interceptors=())
    running = await start_server(spec, port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            request = pb.GenerateRequest(
                model="smollm2-torch", messages=[pb.ChatMessage(role="user", content="What is the capital of France?")],
                sampling=pb.SamplingParams(max_tokens=12, temperature=0),
            )
            replies = [reply async for reply in stub.Generate(request, timeout=240)]
            model = await stub.GetModel(pb.GetModelRequest(id="smollm2-torch"))
    finally:
        await running.stop(0)
    text = "".join(r.text for r in replies)
    assert "Paris" in text
    assert len([r for r in replies if r.text]) >= 3  # streamed, not one blob
    assert replies[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert replies[-1].usage.prompt_tokens > 10 and replies[-1].usage.completion_tokens >= 3
    assert model.engine == "torch" and model.state == pb.MODEL_STATE_READY
