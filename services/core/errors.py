"""Domain exceptions. Code anywhere raises these; one interceptor (core.interceptors) turns them
into gRPC status codes, which Envoy turns into HTTP statuses."""

from __future__ import annotations

import grpc


class ParleyError(Exception):
    """An expected failure with a message fit for the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # A finer reason than the code, for callers that tell refusals apart (OpenAI's error `code`):
    # it travels as REASON_METADATA beside the status, also through services that pass it on.
    reason: str = ""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidArgument(ParleyError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(ParleyError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ParleyError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(ParleyError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ParleyError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ParleyError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ParleyError):
    """A conflicting operation is running (HTTP 409)."""

    code = grpc.StatusCode.ABORTED


class ResourceExhausted(ParleyError):
    """Queue full, rate limit or memory budget (HTTP 429; retry_after becomes Retry-After)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class QuotaExceeded(ResourceExhausted):
    """A daily or monthly token budget is used up (HTTP 429 until it resets; OpenAI's
    insufficient_quota)."""

    reason = "insufficient_quota"


class Unavailable(ParleyError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ParleyError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


REASON_METADATA = "parley-reason"


def reason_of(exc: BaseException) -> str:
    """The exception's reason (ParleyError.reason), also when it came from a downstream service."""
    if isinstance(exc, ParleyError):
        return exc.reason
    if isinstance(exc, grpc.aio.AioRpcError):
        return next((str(v) for k, v in (exc.trailing_metadata() or ()) if k == REASON_METADATA), "")
    return ""


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and caller-facing message for an exception, or INTERNAL for a bug."""
    if isinstance(exc, ParleyError):
        return exc.code, exc.message
    if isinstance(exc, grpc.aio.AioRpcError):
        # A downstream service's answer keeps its code: a missing model stays NOT_FOUND.
        return exc.code(), exc.details() or exc.code().name
    if isinstance(exc, NotImplementedError):
        # The generated servicer base raises this for RPCs a service does not implement yet.
        return grpc.StatusCode.UNIMPLEMENTED, "this method is not implemented yet"
    return grpc.StatusCode.INTERNAL, "internal error"
