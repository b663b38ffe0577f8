"""Sampling parameters as a caller sent them, and the one check of their ranges.

Inference applies them; session checks a session's defaults and a turn's overrides with the same
rules before it stores anything, so a bad value is a 400 up front rather than an error mid-stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from parley.inference.v1 import inference_pb2 as pb

from services.core.errors import InvalidArgument

MAX_STOP_SEQUENCES = 8
MAX_STOP_LENGTH = 256
MAX_LOGIT_BIAS = 1024


@dataclass(frozen=True)
class SamplingInput:
    """Sampling parameters as a caller sent them: None means not set."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: Sequence[str] = ()
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by token id


def from_proto(params: pb.SamplingParams) -> SamplingInput:
    has = params.HasField
    return SamplingInput(
        temperature=params.temperature if has("temperature") else None,
        top_p=params.top_p if has("top_p") else None,
        top_k=params.top_k if has("top_k") else None,
        repetition_penalty=params.repetition_penalty if has("repetition_penalty") else None,
        seed=params.seed if has("seed") else None,
        max_tokens=params.max_tokens if has("max_tokens") else None,
        stop=list(params.stop),
        min_p=params.min_p if has("min_p") else None,
        presence_penalty=params.presence_penalty if has("presence_penalty") else None,
        frequency_penalty=params.frequency_penalty if has("frequency_penalty") else None,
        logit_bias=tuple(sorted(params.logit_bias.items())),
    )


def to_proto(given: SamplingInput) -> pb.SamplingParams:
    """The parameters as sent (unset stays unset): what a cache key or a forwarded request holds."""
    scalars = {name: getattr(given, name) for name in (
        "temperature", "top_p", "top_k", "repetition_penalty", "seed", "max_tokens", "min_p",
        "presence_penalty", "frequency_penalty")}
    return pb.SamplingParams(**{k: v for k, v in scalars.items() if v is not None}, stop=list(given.stop),
                             logit_bias=dict(given.logit_bias))


def validate(given: SamplingInput) -> None:
    """Rejects out-of-range values with INVALID_ARGUMENT."""

    def check(name: str, value: float | None, low: float, high: float) -> None:
        if value is not None and (math.isnan(value) or not low <= value <= high):
            raise InvalidArgument(f"{name} must be between {low} and {high}, got {value}")

    check("temperature", given.temperature, 0.0, 2.0)
    check("top_p", given.top_p, 0.0, 1.0)
    check("top_k", given.top_k, 0, 1000)
    check("repetition_penalty", given.repetition_penalty, 0.5, 2.0)
    check("max_tokens", given.max_tokens, 1, 1_000_000)
    check("min_p", given.min_p, 0.0, 1.0)
    check("presence_penalty", given.presence_penalty, -2.0, 2.0)
    check("frequency_penalty", given.frequency_penalty, -2.0, 2.0)
    if len(given.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidArgument(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens")
    for token, bias in given.logit_bias:
        if token < 0:
            raise InvalidArgument(f"logit_bias: token ids are not negative, got {token}")
        check(f"logit_bias[{token}]", bias, -100.0, 100.0)
    if given.top_p is not None and given.top_p == 0.0:
        raise InvalidArgument("top_p must be greater than 0")
    if len(given.stop) > MAX_STOP_SEQUENCES or any(not s or len(s) > MAX_STOP_LENGTH for s in given.stop):
        raise InvalidArgument(f"stop takes at most {MAX_STOP_SEQUENCES} non-empty sequences "
                              f"of at most {MAX_STOP_LENGTH} characters")
