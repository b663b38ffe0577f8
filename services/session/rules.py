"""Session's small rules: a session's sampling defaults as stored (a dict) and merged with a turn's,
and page tokens (cursors) that a client cannot forge into another kind or shape."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format
from parley.inference.v1 import inference_pb2

from services.core import sampling as sampling_rules
from services.core.errors import InvalidArgument

SAMPLING_FIELDS = frozenset(f.name for f in inference_pb2.SamplingParams.DESCRIPTOR.fields)
REPLACED_FIELDS = ("stop", "logit_bias")  # a list and a map: set whole, never merged entry by entry


def sampling_to_dict(params: inference_pb2.SamplingParams) -> dict[str, Any]:
    return json_format.MessageToDict(params, preserving_proto_field_name=True)


def sampling_from_dict(values: Mapping[str, Any]) -> inference_pb2.SamplingParams:
    return json_format.ParseDict(values, inference_pb2.SamplingParams())


def merge_sampling(base: inference_pb2.SamplingParams, override: inference_pb2.SamplingParams) -> inference_pb2.SamplingParams:
    """`base` with every field that `override` sets (a non-empty stop list or logit_bias map replaces
    the base's)."""
    merged = inference_pb2.SamplingParams()
    merged.CopyFrom(base)
    for descriptor, value in override.ListFields():
        if descriptor.name in REPLACED_FIELDS:
            merged.ClearField(descriptor.name)
            getattr(merged, descriptor.name).MergeFrom(value)
        else:
            setattr(merged, descriptor.name, value)
    return merged


def check_sampling(params: inference_pb2.SamplingParams) -> None:
    sampling_rules.validate(sampling_rules.from_proto(params))


def encode_cursor(kind: str, *values: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps([kind, *values]).encode()).decode().rstrip("=")


CURSOR_SHAPES = {"s": ((int, float), str), "m": (int,)}  # sessions: (update time, id); messages: (seq,)


def decode_cursor(token: str, kind: str) -> list[Any]:
    """The values of a page token of this kind; a token crafted or cut by hand is INVALID_ARGUMENT."""
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(decoded, list) or not decoded or decoded[0] != kind:
            raise ValueError(kind)
        values, shape = decoded[1:], CURSOR_SHAPES[kind]
        if len(values) != len(shape) or any(isinstance(v, bool) or not isinstance(v, t) for v, t in zip(values, shape)):
            raise ValueError(kind)
        return values
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument("page_token is not valid here; pass the next_page_token of the previous page") from None
