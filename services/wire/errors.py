"""What a stream that has already started tells its client when it fails: every wire format sends
this in its own in-band error event (OpenAI's error chunk, Anthropic's `event: error`)."""

from __future__ import annotations

import logging

import grpc

from services.core.errors import status_of
from services.inference.engines.base import EngineError

log = logging.getLogger("parley.inference")


def stream_failure(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message for `exc`; an engine's failure says what failed, a bug is logged and
    stays vague ("internal error")."""
    if isinstance(exc, EngineError):
        return grpc.StatusCode.INTERNAL, str(exc)
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("a completion stream failed", exc_info=exc)
    return code, message
