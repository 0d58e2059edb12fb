"""The one translation layer from failures to OpenAI's error shape.

Inside the server, failures are precise exceptions (APIError and its helpers,
pydantic's ValidationError, UnsupportedOptionError).  Here, at the HTTP edge,
each becomes ``{"error": {"message", "type", "param", "code"}}`` with the right
status.  Anything unexpected becomes a 500 whose details go to a redacted debug
file (when ANYCLAUDE_DEBUG is on), never a traceback to the client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlx_server.schemas import UnsupportedOptionError
from utils_logging import debug, is_debug_enabled, log_debug_error, redact, write_error_debug_file

__all__ = ["APIError", "error_body", "install_error_handlers", "report_unexpected_error"]

logger = logging.getLogger("mlx")


class APIError(Exception):
    """A failure with an HTTP status and OpenAI's error fields."""

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


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _response(error: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(error.message, error.error_type, error.param, error.code), error.status, headers=error.headers
    )


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
    return part in _TYPE_TAGS or "[" in part or part.startswith(("function-", "constrained-"))


_TYPE_TAGS = frozenset(
    {"str", "int", "float", "bool", "dict", "list", "none", "ContentPart", "StreamOptions", "NamedToolChoice"}
)


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


async def report_unexpected_error(request: Request, error: BaseException) -> JSONResponse:
    """The guide's Step 5: debug file, log line, and a 500 that carries no traceback."""
    debug_file = write_error_debug_file(
        status_code=500,
        request_info=await _request_info(request),
        response_info={"statusCode": 500, "body": f"{type(error).__name__}: {error}"},
    )
    if debug_file:
        log_debug_error(
            "HTTP", 500, debug_file, {"provider": "mlx", "model": getattr(request.app.state, "model_name", "unknown")}
        )
    logger.error(
        "Unhandled exception in %s %s: %s: %s",
        request.method,
        request.url.path,
        type(error).__name__,
        error,
        exc_info=error,
    )
    body = error_body(
        "the server hit an internal error; the request was not completed", "server_error", code="internal_error"
    )
    if debug_file and is_debug_enabled():
        body["error"]["debug_file"] = debug_file
    return JSONResponse(body, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure through OpenAI's error shape."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, error: APIError) -> JSONResponse:
        return _response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        api_error = validation_error(error.errors())
        debug(1, "Rejected request", lambda: {"param": api_error.param, "message": api_error.message})
        return _response(api_error)

    @app.exception_handler(UnsupportedOptionError)
    async def _unsupported(_request: Request, error: UnsupportedOptionError) -> JSONResponse:
        return _response(APIError(400, str(error), param=error.param, code="unsupported_parameter"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"unknown URL: {request.method} {request.url.path}"
            return _response(APIError(404, message, code="unknown_url"))
        if error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
            return _response(APIError(405, message, code="method_not_allowed"))
        detail = error.detail if isinstance(error.detail, str) else json.dumps(redact(error.detail))
        code = "request_too_large" if error.status_code == 413 else None
        return _response(APIError(error.status_code, detail, code=code, headers=dict(error.headers or {})))
