"""JSON from callers: request bodies that arrive as JSON bytes (the OpenAI-shaped endpoints: chat and
legacy completions, embeddings, responses) and JSON carried as text in a field (a tool's parameters,
a response format's schema, a tool call's arguments, on every path). Each wrong value is a 400
naming the field: text that does not parse, nesting deeper than MAX_DEPTH, numbers out of range."""

from __future__ import annotations

import json
import math
from typing import Any

from services.core.errors import InvalidArgument


# Arrays and objects inside one another. A request body with a tool's schema in it is about a dozen
# deep (OpenAI allows schemas 10 deep); the grammar compiler and the recursive checks behind it
# fail somewhere past a few hundred levels, and the parser past about a thousand.
MAX_DEPTH = 128


def loads(data: str | bytes, what: str) -> Any:
    """JSON text from a caller; `what` names it in the 400 when it does not parse or nests too deeply."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise InvalidArgument(f"{what} nests too deeply (at most {MAX_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    if _deeper_than(value, MAX_DEPTH):
        raise InvalidArgument(f"{what} nests too deeply (at most {MAX_DEPTH} levels)")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels (without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_object(data: bytes) -> dict[str, Any]:
    """The body as a JSON object."""
    body = loads(data or b"null", "the request body")
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


def text_parts(content: Any, where: str, types: tuple[str, ...], joiner: str = "") -> str:
    """A message's content as one text: a string, or an array of parts whose type is one of
    `types` (their "text") or "refusal" (its "refusal"), joined by `joiner`; any other part is a
    400 naming it."""
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
    return joiner.join(texts)
