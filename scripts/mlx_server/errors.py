"""Failures: one neutral exception inside, one translation into each dialect's error shape at the HTTP edge.

Inside the server, failures are precise exceptions (APIError and its
subclasses, pydantic's ValidationError, UnsupportedOptionError).  At the edge,
``ErrorShapes`` picks the dialect by path (Anthropic's routes answer in
Anthropic's shape, everything else in OpenAI's) and renders the error with the
right status.  Anything unexpected becomes a 500 whose details go to a
redacted debug file (when ANYCLAUDE_DEBUG is on), never a traceback to the
client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from utils_logging import debug, is_debug_enabled, log_debug_error, redact, write_error_debug_file

__all__ = [
    "APIError",
    "ContextOverflowError",
    "ErrorShapes",
    "UnsupportedOptionError",
    "install_error_handlers",
    "openai_error",
    "openai_error_body",
    "report_unexpected_error",
    "validation_error",
]

logger = logging.getLogger("mlx")


class APIError(Exception):
    """A failure with an HTTP status; ``error_type``, ``param`` and ``code`` are OpenAI's fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = headers


class ContextOverflowError(APIError):
    """The prompt (plus the requested completion) does not fit the model's context.

    The default message is OpenAI's wording, which litellm and langchain match
    to trigger their overflow handling; Anthropic's routes word it as
    Anthropic does ("prompt is too long: N tokens > M maximum").
    """

    def __init__(self, context_length: int, prompt_tokens: int, completion_tokens: int | None, param: str) -> None:
        self.context_length = context_length
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        if completion_tokens is None:
            message = (
                f"This model's maximum context length is {context_length} tokens. However, your messages resulted "
                f"in {prompt_tokens} tokens. Please reduce the length of the messages."
            )
        else:
            message = (
                f"This model's maximum context length is {context_length} tokens. However, you requested "
                f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the messages, {completion_tokens} "
                "in the completion). Please reduce the length of the messages or completion."
            )
        super().__init__(400, message, param=param, code="context_length_exceeded")


class UnsupportedOptionError(ValueError):
    """A recognised option with a value this server does not support."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def openai_error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


ErrorShape = Callable[[APIError], tuple[int, dict[str, Any]]]
"""A dialect's rendering of an error: the status it answers with and the body."""


def openai_error(error: APIError) -> tuple[int, dict[str, Any]]:
    return error.status, openai_error_body(error.message, error.error_type, error.param, error.code)


class ErrorShapes:
    """Which dialect's error shape a path answers in: the longest matching prefix, OpenAI's otherwise."""

    def __init__(self, shapes: Mapping[str, ErrorShape] | None = None) -> None:
        self._shapes = sorted((shapes or {}).items(), key=lambda item: -len(item[0]))

    def render(self, path: str, error: APIError) -> tuple[int, dict[str, Any]]:
        for prefix, shape in self._shapes:
            if path.startswith(prefix):
                return shape(error)
        return openai_error(error)

    def response(self, path: str, error: APIError) -> JSONResponse:
        status, body = self.render(path, error)
        return JSONResponse(body, status, headers=error.headers)


def _param_path(location: Sequence[Any]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages[0].role"``."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "body" and not _is_union_member_tag(str(part)):
            path += f".{part}" if path else str(part)
    return path or None


def _is_union_member_tag(part: str) -> bool:
    """pydantic names the member of a union that failed (``str``, ``list[str]``, ``function-after[...]``)."""
    return part in _TYPE_TAGS or "[" in part or part.startswith(("function-", "constrained-")) or part[:1].isupper()


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _validation_message(error: dict[str, Any], param: str | None) -> str:
    if error.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    if error.get("type") == "missing":
        return f"missing required parameter: {param}"
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    return f"invalid value for {param}: {message}" if param else message


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """pydantic/FastAPI validation errors -> one 400 naming the first bad field."""
    if not errors:
        return APIError(400, "invalid request")
    # With union types pydantic reports each alternative; the most specific location is the most useful.
    first = max(errors, key=lambda error: len(error.get("loc", ())))
    if any(error.get("type") == "json_invalid" for error in errors):
        first = next(error for error in errors if error.get("type") == "json_invalid")
    param = _param_path(first.get("loc", ()))
    code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_value"
    return APIError(400, _validation_message(first, param), param=param, code=code)


async def _request_info(request: Request) -> dict[str, Any]:
    body = getattr(request.state, "raw_body", None)
    text = bytes(body).decode("utf-8", errors="replace") if isinstance(body, (bytes, bytearray)) else None
    return {"method": request.method, "url": str(request.url), "headers": dict(request.headers), "body": text}


INTERNAL_ERROR = "the server hit an internal error; the request was not completed"


def report_failure(error: BaseException, request_info: dict[str, Any], model: str = "unknown") -> str | None:
    """An unexpected failure: a redacted debug file and an ERROR line (LOGGING_GUIDE.md, "Error debug files")."""
    debug_file = write_error_debug_file(
        status_code=500,
        request_info=request_info,
        response_info={"statusCode": 500, "body": f"{type(error).__name__}: {error}"},
    )
    if debug_file:
        log_debug_error("HTTP", 500, debug_file, {"provider": "mlx", "model": model})
    logger.error("Unexpected failure: %s: %s", type(error).__name__, error, exc_info=error)
    return debug_file


async def report_unexpected_error(request: Request, error: BaseException) -> JSONResponse:
    """A 500 in the route's dialect that carries no traceback (with the debug file's path when debugging)."""
    debug_file = report_failure(error, await _request_info(request), getattr(request.app.state, "model_name", "?"))
    api_error = APIError(500, INTERNAL_ERROR, error_type="server_error", code="internal_error")
    status, body = request.app.state.error_shapes.render(request.url.path, api_error)
    if debug_file and is_debug_enabled():
        body["error"]["debug_file"] = debug_file
    return JSONResponse(body, status_code=status)


def install_error_handlers(app: FastAPI, shapes: ErrorShapes) -> None:
    """Route every failure through its dialect's error shape."""
    app.state.error_shapes = shapes

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return shapes.response(request.url.path, error)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        api_error = validation_error(error.errors())
        debug(1, "Rejected request", lambda: {"param": api_error.param, "message": api_error.message})
        return shapes.response(request.url.path, api_error)

    @app.exception_handler(UnsupportedOptionError)
    async def _unsupported(request: Request, error: UnsupportedOptionError) -> JSONResponse:
        debug(1, "Rejected request", lambda: {"param": error.param, "message": str(error)})
        api_error = APIError(400, str(error), param=error.param, code="unsupported_parameter")
        return shapes.response(request.url.path, api_error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        if error.status_code == 404:
            return shapes.response(path, APIError(404, f"unknown URL: {request.method} {path}", code="unknown_url"))
        if error.status_code == 405:
            message = f"method {request.method} is not allowed on {path}"
            return shapes.response(path, APIError(405, message, code="method_not_allowed"))
        detail = error.detail if isinstance(error.detail, str) else json.dumps(redact(error.detail))
        code = "request_too_large" if error.status_code == 413 else None
        api_error = APIError(error.status_code, detail, code=code, headers=dict(error.headers or {}))
        return shapes.response(path, api_error)
