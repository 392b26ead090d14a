"""OpenAI-style error bodies and the handlers that turn every failure into one.

Whatever goes wrong, the client gets `{"error": {"message", "type", "param", "code"}}` with
the right status and the server log gets one line; never a traceback in a response.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, MiniEngineError, PromptTooLong
from .protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("mini_engine.server")

# OpenAI's error types by status.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          499: "invalid_request_error", 500: "internal_error", 503: "service_unavailable", 504: "timeout"}

_PROMPT_FORMS = "prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.counted = False  # set where the error was counted per engine request already

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    info = ErrorInfo(message=message, type=_TYPES.get(status, "invalid_request_error"), param=param, code=code)
    return ErrorResponse(error=info).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def from_engine_error(e: MiniEngineError) -> APIError:
    """The engine's own refusals (a prompt too long, a bad id, a request that can never fit) are
    the client's mistakes: 400 with the engine's one-line message."""
    if isinstance(e, PromptTooLong):
        return APIError(400, str(e), "prompt", "context_length_exceeded")
    if isinstance(e, ConfigError):
        return APIError(400, str(e))
    log.error("engine refused a request: %s: %s", type(e).__name__, e)
    return APIError(500, "the engine could not take this request; see the server log", code="internal_error")


def field_param(message: str, body_model) -> str | None:
    """The request field a SamplingParams message is about (its first word), in the API's name."""
    name = message.split(" ", 1)[0]
    name = {"max_new_tokens": "max_tokens"}.get(name, name) if "max_tokens" in body_model.model_fields else name
    return name if name in body_model.model_fields else None


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    if not loc and kind in ("missing", "model_attributes_type", "dict_type", "model_type"):
        return "the request body must be a JSON object (Content-Type: application/json)", None
    cause = (first.get("ctx") or {}).get("error")
    param = getattr(cause, "param", None) or (loc[0] if loc else None)
    if param == "prompt" and kind != "value_error":
        return _PROMPT_FORMS, "prompt"
    msg = str(cause) if cause is not None else first.get("msg", "invalid value")
    if kind == "extra_forbidden":
        msg = f"unknown field '{loc[-1]}'"
    elif loc and cause is None:
        msg = f"{'.'.join(loc)}: {msg}"
    return msg, param


def count_error(request: Request, status: int) -> None:
    """Every answered error counts in /metrics by status (an app without server state: none)."""
    state = getattr(request.app.state, "server", None)
    if state is not None:
        state.metrics.error(status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        if not exc.counted:
            count_error(request, exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        msg, param = validation_message(exc)
        log.warning("%s %s -> 400: %s", request.method, request.url.path, msg)
        count_error(request, 400)
        return error_response(400, msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}; see GET /v1/models, POST /v1/completions"
        elif exc.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            msg = "the request body could not be read: send UTF-8 JSON"  # e.g. bytes that are not UTF-8
        else:
            msg = str(exc.detail)
        log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, msg)
        count_error(request, exc.status_code)
        return error_response(exc.status_code, msg, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.error("%s %s -> 500: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        count_error(request, 500)
        return error_response(500, "internal error; see the server log", code="internal_error")
