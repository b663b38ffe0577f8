"""JSON lines on stdout: one object per record with time, level, service, logger and message, plus
trace_id and span_id of the current OpenTelemetry span and the request id (Envoy's x-request-id)
while a request is being handled.

Extra fields passed as `logger.info("...", extra={"fields": {...}})` are merged into the object.
Message contents, passwords and tokens must never be passed to a log call at info level.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace

# Request-scoped fields (request id, trace ids) that every record of the request carries.
request_fields: ContextVar[dict[str, str] | None] = ContextVar("request_fields", default=None)

_service = "parley"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": _service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = trace.format_trace_id(span.trace_id)
            entry["span_id"] = trace.format_span_id(span.span_id)
        entry.update(request_fields.get() or {})
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(service: str, level: str = "INFO") -> None:
    """Routes every logger to JSON on stdout. Call once at process start."""
    global _service
    _service = service
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter stays at warning unless asked for.
    for noisy in ("asyncio", "grpc", "urllib3", "httpx", "httpcore", "psycopg"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
