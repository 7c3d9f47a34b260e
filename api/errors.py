"""One error shape everywhere: RFC 9457 problem details (``application/problem+json``)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://builder-engine.dev/problems/"


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the offending field, e.g. `brain.temperature`.")
    message: str
    type: str = Field(description="Machine-readable error kind, e.g. `less_than_equal`.")


class Problem(BaseModel):
    type: str = Field(description="URI naming the kind of problem.")
    title: str
    status: int
    detail: str | None = None
    errors: list[FieldError] = Field(default_factory=list)


class ApiError(Exception):
    """Raise from handlers to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind or _slug(status)
        self.errors = errors or []
        self.headers = headers or {}


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, f"{what} '{ident}' was not found", kind="not-found")


def field_error(field: str, message: str, status: int = 422) -> ApiError:
    return ApiError(
        status,
        message,
        kind="validation-error" if status == 422 else None,
        errors=[FieldError(field=field, message=message, type="invalid")],
    )


# RFC 9110 names; Python's http module renamed these between versions.
_TITLES = {413: "Content Too Large", 422: "Unprocessable Content"}


def _title(status: int) -> str:
    if status in _TITLES:
        return _TITLES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _slug(status: int) -> str:
    return _title(status).lower().replace(" ", "-")


def problem_response(
    status: int,
    detail: str | None,
    *,
    kind: str | None = None,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = Problem(
        type=PROBLEM_BASE + (kind or _slug(status)),
        title=_title(status),
        status=status,
        detail=detail,
        errors=errors or [],
    )
    return JSONResponse(
        body.model_dump(), status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE
    )


def _location(loc: tuple[Any, ...]) -> str:
    # Drop FastAPI's leading "body"/"query"/"path" unless it is all there is.
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in {"body", "query", "path", "header"}:
        parts = parts[1:]
    return ".".join(parts) or "body"


def _validation_errors(exc: RequestValidationError) -> list[FieldError]:
    errors = []
    for error in exc.errors():
        message = str(error.get("msg", "invalid"))
        if message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        errors.append(
            FieldError(
                field=_location(tuple(error.get("loc", ()))),
                message=message,
                type=str(error.get("type", "invalid")),
            )
        )
    return errors


async def _on_api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return problem_response(
        exc.status, exc.detail, kind=exc.kind, errors=exc.errors, headers=exc.headers
    )


async def _on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _validation_errors(exc)
    fields = ", ".join(sorted({e.field for e in errors}))
    return problem_response(
        422, f"The request is invalid: {fields}", kind="validation-error", errors=errors
    )


async def _on_http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers) if exc.headers else None
    detail = exc.detail if isinstance(exc.detail, str) else _title(exc.status_code)
    return problem_response(exc.status_code, detail, headers=headers)


async def _on_unexpected(_request: Request, _exc: Exception) -> JSONResponse:
    # The traceback goes to the log by Starlette's ServerErrorMiddleware; the client
    # only learns that it was our fault.
    return problem_response(500, "An unexpected error occurred.", kind="internal-error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)


def _problem_doc(description: str) -> dict[str, Any]:
    return {
        "model": Problem,
        "description": description,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


#: OpenAPI `responses=` for the errors every authenticated route can give.
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _problem_doc("Missing, unknown or revoked API key."),
    413: _problem_doc("Request body too large."),
    422: _problem_doc("Invalid request; `errors` names each field."),
    429: _problem_doc("Rate limit exceeded; see the Retry-After header."),
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: _problem_doc("No such resource here.")}
CONFLICT: dict[int | str, dict[str, Any]] = {409: _problem_doc("Conflicts with current state.")}
