"""Failures as HTTP sees them: the status and OpenAI's fields for every domain exception, and OpenAI's shape.

Below the dialects, failures are ``vocabulary`` exceptions that say what went
wrong; ``http_error`` gives each its status here, once.  Each dialect renders
an ``APIError`` in its own shape (OpenAI's below, Anthropic's in
``anthropic_messages``), for a response or as an in-stream error event.
"""

from __future__ import annotations

from typing import Any

from mlx_server.vocabulary import (
    ConflictError,
    ContextOverflowError,
    ForbiddenError,
    InternalError,
    InvalidRequestError,
    KVBudgetError,
    ModelLoadingError,
    ModelUnavailableError,
    ModelUnloadedError,
    NotFoundError,
    RequestTimeoutError,
    ServerError,
)

__all__ = ["APIError", "http_error", "openai_error", "openai_error_body", "openai_overflow_message"]


class APIError(Exception):
    """A failure with an HTTP status; ``error_type``, ``param`` and ``code`` are OpenAI's fields.

    ``cause`` is the domain exception it renders, for dialects that word some
    failures their own way.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        cause: ServerError | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = headers
        self.cause = cause


def openai_overflow_message(error: ContextOverflowError) -> str:
    """OpenAI's wording, which litellm and langchain match to start their overflow handling."""
    if error.completion_tokens is None:
        return (
            f"This model's maximum context length is {error.context_length} tokens. However, your messages resulted "
            f"in {error.prompt_tokens} tokens. Please reduce the length of the messages."
        )
    return (
        f"This model's maximum context length is {error.context_length} tokens. However, you requested "
        f"{error.prompt_tokens + error.completion_tokens} tokens ({error.prompt_tokens} in the messages, "
        f"{error.completion_tokens} in the completion). Please reduce the length of the messages or completion."
    )


def http_error(error: ServerError) -> APIError:
    """The status and fields of a domain failure."""
    if isinstance(error, ContextOverflowError):
        message = openai_overflow_message(error)
        return APIError(400, message, param=error.param, code="context_length_exceeded", cause=error)
    if isinstance(error, InvalidRequestError):
        return APIError(400, error.message, param=error.param, code=error.code, cause=error)
    if isinstance(error, KVBudgetError):
        return APIError(400, error.message, param="max_tokens", code="kv_budget_exceeded", cause=error)
    if isinstance(error, NotFoundError):
        return APIError(404, error.message, param=error.param, code=error.code, cause=error)
    if isinstance(error, ConflictError):
        return APIError(409, error.message, param=error.param, code=error.code, cause=error)
    if isinstance(error, ForbiddenError):
        return APIError(403, error.message, error_type="permission_error", param=error.param, code=error.code,
                        cause=error)  # fmt: skip
    if isinstance(error, ModelLoadingError):
        return APIError(503, error.message, error_type="server_error", code="model_loading", cause=error)
    if isinstance(error, (ModelUnavailableError, ModelUnloadedError)):
        code = error.code or "model_unloaded"
        return APIError(503, error.message, error_type="server_error", param="model", code=code, cause=error)
    if isinstance(error, RequestTimeoutError):
        return APIError(504, error.message, error_type="server_error", code="request_timeout", cause=error)
    if isinstance(error, InternalError):
        return APIError(500, error.message, error_type="server_error", code="internal_error", cause=error)
    return APIError(500, error.message, error_type="server_error", cause=error)


def openai_error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def openai_error(error: APIError) -> tuple[int, dict[str, Any]]:
    return error.status, openai_error_body(error.message, error.error_type, error.param, error.code)
