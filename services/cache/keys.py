"""What makes two completion requests the same: the canonical key and the determinism rule.

Both the cache service and its callers (services.cache.client) use these, so a caller never asks
for something the service would refuse to cache.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from google.protobuf import json_format
from parley.cache.v1 import cache_pb2
from parley.inference.v1 import inference_pb2

# Bumped when the canonical form changes, so old entries simply stop matching.
KEY_VERSION = "v1"
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "max_tokens", "min_p",
                   "presence_penalty", "frequency_penalty")


# Answers that ended by themselves or at max_tokens are the request's answer; a cancelled one is not.
COMPLETE = (inference_pb2.FINISH_REASON_STOP, inference_pb2.FINISH_REASON_LENGTH, inference_pb2.FINISH_REASON_TOOL_CALLS)


def is_deterministic(sampling: inference_pb2.SamplingParams) -> bool:
    """Greedy decoding (temperature explicitly 0) or an explicit seed: the same request gives the
    same text. An unset temperature means the model's default (> 0), so it does not count."""
    if sampling.HasField("seed"):
        return True
    return sampling.HasField("temperature") and sampling.temperature == 0.0


def canonical(key: cache_pb2.CompletionKey, scope: str = "") -> dict[str, Any]:
    """The request as plain JSON data. Unset sampling fields are left out rather than filled with
    defaults: the defaults belong to the inference service and may change. Stop sequences are a set."""
    sampling: dict[str, Any] = {}
    for name in SAMPLING_FIELDS:
        if key.sampling.HasField(name):
            sampling[name] = getattr(key.sampling, name)
    if key.sampling.stop:
        sampling["stop"] = sorted(set(key.sampling.stop))
    if key.sampling.logit_bias:
        sampling["logit_bias"] = sorted(key.sampling.logit_bias.items())
    form: dict[str, Any] = {
        "model": key.model,
        "model_fingerprint": key.model_fingerprint,
        "messages": [_message(m) for m in key.messages],
        "sampling": sampling,
    }
    if key.prompt:  # a text completion's raw prompt; chat keys keep their old form
        form["prompt"] = key.prompt
    if key.HasField("structured") and key.structured.ByteSize():
        # Tools in the order given (it is the order the prompt lists them in).
        form["structured"] = json_format.MessageToDict(key.structured, preserving_proto_field_name=True)
    if key.HasField("fit"):
        form["fit"] = {"keep_last": key.fit.keep_last, "reserve_tokens": key.fit.reserve_tokens}
    if scope:
        form["scope"] = scope
    return form


def _message(m: inference_pb2.ChatMessage) -> list[Any]:
    form: list[Any] = [m.role, m.content]
    if m.tool_calls or m.tool_call_id:  # plain messages keep the short form (and old entries' names)
        form += [[[c.id, c.name, c.arguments] for c in m.tool_calls], m.tool_call_id]
    return form


def digest(key: cache_pb2.CompletionKey, scope: str = "") -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace, UTF-8): the entry's name."""
    text = json.dumps(canonical(key, scope), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    return hashlib.sha256(f"{KEY_VERSION}\n{text}".encode()).hexdigest()


def cacheable(key: cache_pb2.CompletionKey) -> str | None:
    """Why this key may not be cached, or None when it may."""
    if not key.model:
        return "no model"
    if not key.model_fingerprint:
        return "the model has no fingerprint, so a changed weights file could not be told apart"
    if not key.messages and not key.prompt:
        return "no messages or prompt"
    if key.messages and key.prompt:
        return "both messages and a prompt"
    if not is_deterministic(key.sampling):
        return "not deterministic: set temperature to 0 or a seed"
    for name in ("temperature", "top_p", "repetition_penalty", "min_p", "presence_penalty", "frequency_penalty"):
        if key.sampling.HasField(name) and not math.isfinite(getattr(key.sampling, name)):
            return f"{name} is not a finite number"
    if not all(math.isfinite(bias) for bias in key.sampling.logit_bias.values()):
        return "a logit_bias value is not a finite number"
    return None
