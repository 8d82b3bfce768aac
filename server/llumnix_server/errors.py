"""Errors as each API family shapes them: OpenAI's `{"error": {...}}` under /v1, Triton's
`{"error": "..."}` elsewhere; one status code per kind of failure.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llumnix_backend.policies.dispatch import NoInstanceAvailable
from llumnix_backend.errors import Overloaded, Refusal, Refused, RequestTimedOut, ShuttingDown
from llumnix_backend.model_registry import ModelNotFound, ModelNotReady
from llumnix_backend.plugin import EngineDead
from llumnix_backend.requests import RequestError

OPENAI_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    409: "ConflictError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


# Routes whose errors take OpenAI's shape (vLLM's utility routes have it there); KServe's elsewhere.
OPENAI_SHAPED = ("/v1/", "/tokenize", "/detokenize")


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    if request.url.path.startswith(OPENAI_SHAPED):
        body = {
            "error": {
                "message": message,
                "type": OPENAI_ERROR_TYPES.get(status, HTTPStatus(status).phrase),
                "param": param,
                "code": status,
            }
        }
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)


REFUSAL_STATUS = {Refusal.INVALID: 400, Refusal.NOT_FOUND: 404, Refusal.CONFLICT: 409}


def as_api_error(exc: Exception) -> ApiError:
    """Map a core exception to its HTTP status; anything unknown is a 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestError):
        return ApiError(400, str(exc), exc.field)
    if isinstance(exc, ModelNotFound):
        return ApiError(404, str(exc), "model")
    if isinstance(exc, ModelNotReady):
        return ApiError(503, str(exc), "model")
    if isinstance(exc, RequestTimedOut):
        return ApiError(504, str(exc))
    if isinstance(exc, ShuttingDown):
        return ApiError(503, str(exc))
    if isinstance(exc, Overloaded):
        return ApiError(503, str(exc), "model", {"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, NoInstanceAvailable):
        return ApiError(503, "no instance of the model is accepting requests", "model")
    if isinstance(exc, Refused):
        return ApiError(REFUSAL_STATUS[exc.refusal], str(exc))
    if isinstance(exc, EngineDead):
        return ApiError(500, f"the engine failed: {exc}")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}")


def first_validation_problem(errors: list[Any], prefix: str = "") -> tuple[str, str | None]:
    """(message, field) for the first problem pydantic found; the field path leaves out
    FastAPI's 'body' root and starts with `prefix` if given."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON: {first.get('msg')}", None
    path = [prefix] if prefix else []
    path += [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(path) or None
    reason = "unknown field" if first.get("type") == "extra_forbidden" else first.get("msg")
    return (f"{field}: {reason}" if field else str(reason)), field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = first_validation_problem(exc.errors())
        return error_response(request, 400, message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, str(exc.detail))

    for kind in (ApiError, RequestError, ModelNotFound, ModelNotReady, NoInstanceAvailable, EngineDead, Refused,
                 Overloaded, RequestTimedOut, ShuttingDown):

        @app.exception_handler(kind)
        async def _mapped(request: Request, exc: Exception) -> JSONResponse:
            err = as_api_error(exc)
            return error_response(request, err.status, err.message, err.param, err.headers)
