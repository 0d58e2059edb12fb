"""Failures as responses: each in the error shape of the dialect its path belongs to, never a traceback.

Inside the server, failures are domain exceptions (``vocabulary.ServerError``
and its kinds), pydantic's validation errors, and the guards' ``APIError``.
Here ``ErrorShapes`` picks the dialect by path (Anthropic's routes answer in
Anthropic's shape, everything else in OpenAI's) and the handlers render every
failure with its status (``dialects.errors.http_error``).  Anything unexpected
becomes a 500 whose details go to a redacted debug file (when ANYCLAUDE_DEBUG
is on).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlx_server.chat.failures import report_failure
from mlx_server.dialects.errors import APIError, http_error, openai_error
from mlx_server.dialects.validation import most_specific, param_path
from mlx_server.vocabulary import ServerError
from utils_logging import debug, is_debug_enabled, redact

__all__ = ["ErrorShapes", "install_error_handlers", "report_unexpected_error", "validation_error"]


ErrorShape = Callable[[APIError], tuple[int, dict[str, Any]]]
"""A dialect's rendering of an error: the status it answers with and the body."""


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
    first = most_specific(errors)  # a union reports each alternative; the deepest is the most useful
    param = param_path(first.get("loc", ()))
    code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_value"
    return APIError(400, _validation_message(first, param), param=param, code=code)


async def _request_info(request: Request) -> dict[str, Any]:
    body = getattr(request.state, "raw_body", None)
    text = bytes(body).decode("utf-8", errors="replace") if isinstance(body, (bytes, bytearray)) else None
    return {"method": request.method, "url": str(request.url), "headers": dict(request.headers), "body": text}


INTERNAL_ERROR = "the server hit an internal error; the request was not completed"


async def report_unexpected_error(request: Request, error: BaseException) -> JSONResponse:
    """A 500 in the route's dialect that carries no traceback (the debug file's name when debugging).

    The body names the file, never its directory: no server path reaches a client (the log line has the path).
    """
    debug_file = report_failure(error, await _request_info(request), getattr(request.app.state, "model_name", "?"))
    api_error = APIError(500, INTERNAL_ERROR, error_type="server_error", code="internal_error")
    status, body = request.app.state.error_shapes.render(request.url.path, api_error)
    if debug_file and is_debug_enabled():
        if isinstance(body.get("error"), dict):
            body["error"]["debug_file"] = os.path.basename(debug_file)
        else:  # Ollama's shape: the error is a string
            body["debug_file"] = os.path.basename(debug_file)
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

    @app.exception_handler(ServerError)
    async def _domain_error(request: Request, error: ServerError) -> JSONResponse:
        api_error = http_error(error)
        if api_error.status < 500:
            debug(1, "Rejected request", lambda: {"param": api_error.param, "message": api_error.message})
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
