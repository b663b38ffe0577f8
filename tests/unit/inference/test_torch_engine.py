"""The torch engine streams a real model on CPU through the same Generate RPC as llama.cpp, with
tool calls and JSON schemas enforced by the same grammars (xgrammar there, llama.cpp's sampler here).

transformers loads the bundled GGUF (dequantized to float32): no hub download is involved."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import grpc
import jsonschema
from parley.inference.v1 import inference_pb2 as pb
from parley.inference.v1 import inference_pb2_grpc

from services.core import config
from services.core.server import start_server
from services.inference.app import build
from services.inference.models.registry import BUNDLED
from services.inference.settings import InferenceSettings


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"]}
CAT = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                        "legs": {"type": "integer", "minimum": 3, "maximum": 4},
                                        "colour": {"enum": ["black", "white", "ginger"]}},
       "required": ["name", "legs", "colour"], "additionalProperties": False}


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
            called = [reply async for reply in stub.Generate(pb.GenerateRequest(
                model="smollm2-torch", messages=[pb.ChatMessage(role="user", content="Weather in Paris?")],
                sampling=pb.SamplingParams(max_tokens=40, temperature=0),
                structured=pb.StructuredOutput(tools=[pb.Tool(name="get_weather", parameters=json.dumps(WEATHER))],
                                               tool_choice="required", parallel_tool_calls=False)), timeout=240)]
            shaped = [reply async for reply in stub.Generate(pb.GenerateRequest(
                model="smollm2-torch", messages=[pb.ChatMessage(role="user", content="Describe a cat as JSON.")],
                sampling=pb.SamplingParams(max_tokens=60, temperature=0),
                structured=pb.StructuredOutput(response_format="json_schema", json_schema=json.dumps(CAT))),
                timeout=240)]
    finally:
        await running.stop(0)
    text = "".join(r.text for r in replies)
    assert "Paris" in text
    assert len([r for r in replies if r.text]) >= 3  # streamed, not one blob
    assert replies[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert replies[-1].usage.prompt_tokens > 10 and replies[-1].usage.completion_tokens >= 3
    assert model.engine == "torch" and model.state == pb.MODEL_STATE_READY
    calls = [c for r in called for c in r.tool_calls]
    assert called[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS and len(calls) == 1, called
    assert calls[0].name == "get_weather" and calls[0].id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    assert shaped[-1].finish_reason == pb.FINISH_REASON_STOP, shaped
    jsonschema.validate(json.loads("".join(r.text for r in shaped)), CAT)
