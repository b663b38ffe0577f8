"""Request bodies that arrive as JSON bytes (the OpenAI-shaped endpoints: chat and legacy
completions, embeddings, responses): the object itself and its numbers, each wrong value a 400
naming the field."""

from __future__ import annotations

import json
import math
from typing import Any

from services.core.errors import InvalidArgument


def parse_object(data: bytes) -> dict[str, Any]:
    """The body as a JSON object."""
    try:
        body = json.loads(data or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument("the request body nests too deeply") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return body


def number(body: dict[str, Any], key: str, kind: type) -> Any:
    """body[key] as an int or a float (None when absent); a bool, a string, a fraction where an
    integer belongs, infinity or a 400-digit integer is no one's parameter."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and isinstance(value, float) and not value.is_integer()) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise InvalidArgument(f"{key} must be {'an integer' if kind is int else 'a number'}")
    if isinstance(value, int) and abs(value) > 2**53:
        raise InvalidArgument(f"{key} is out of range")
    return kind(value)


def text_parts(content: Any, where: str, types: tuple[str, ...]) -> str:
    """A message's content as one text: a string, or an array of parts whose type is one of
    `types` (their "text") or "refusal" (its "refusal"); any other part is a 400 naming it."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidArgument(f"{where} must be a string or an array of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        key = "refusal" if kind == "refusal" else "text"
        if (kind not in types and kind != "refusal") or not isinstance(part.get(key), str):
            raise InvalidArgument(f"{where}[{j}]: only text parts are supported ({', '.join(types)}), got {kind!r}")
        texts.append(part[key])
    return "".join(texts)
