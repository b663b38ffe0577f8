"""Error types by HTTP status, one table per wire format that names them, shared by the service
(errors inside a stream) and the gateway's Lua filter (errors that are an HTTP status)."""

from __future__ import annotations

# Anthropic's error types (what its SDKs read beside the status); any other status is "api_error".
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         503: "overloaded_error", 529: "overloaded_error"}

# The HTTP status Envoy's transcoder answers for a gRPC status code (by its number).
HTTP_STATUS = {3: 400, 9: 400, 11: 400, 16: 401, 7: 403, 5: 404, 6: 409, 10: 409, 8: 429, 14: 503, 4: 504}
