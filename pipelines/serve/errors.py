"""Errors of the serve app: ApiError and its subclasses (one per HTTP status), ErrorBody (an error as data, across
the backbone's handle), the mapping of mosaic_core's errors, and the one OpenAI error shape the ingress renders."""

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from mosaic_core.errors import MosaicError, UnknownCategoryError


class ApiError(Exception):
    """A request failure with its HTTP status and OpenAI error fields; the ingress renders every one the same way."""

    status: int = 400
    type: str = "invalid_request_error"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.retry_after_s = message, param, code, retry_after_s

    def to_body(self) -> "ErrorBody":
        return ErrorBody(
            message=self.message,
            type=self.type,
            param=self.param,
            code=self.code,
            status=self.status,
            retry_after_s=self.retry_after_s,
        )


class InvalidRequest(ApiError):
    """400: the request is malformed or names something that does not exist."""


class Unauthorized(ApiError):
    status, type = 401, "authentication_error"


class Forbidden(ApiError):
    status, type = 403, "permission_error"


class NotFound(ApiError):
    status = 404


class Overloaded(ApiError):
    """429: the backbone's queue is full; the client should retry after `Retry-After` seconds."""

    status, type = 429, "rate_limit_error"


class Unavailable(ApiError):
    status, type = 503, "server_error"


class InternalError(ApiError):
    status, type = 500, "server_error"


class Cancelled(ApiError):
    """499 (nginx's "client closed request"): the caller went away; nobody reads it but the audit log."""

    status, type = 499, "server_error"


class ErrorBody(BaseModel):
    """An ApiError as data: crosses the handle from the backbone to the ingress (exceptions would arrive wrapped)."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None
    status: int = 400
    retry_after_s: float | None = None

    def raise_(self) -> None:
        cls = {401: Unauthorized, 403: Forbidden, 404: NotFound, 429: Overloaded, 503: Unavailable}.get(
            self.status, InternalError if self.status >= 500 else InvalidRequest
        )
        err = cls(self.message, param=self.param, code=self.code, retry_after_s=self.retry_after_s)
        err.status, err.type = self.status, self.type
        raise err


def _from_mosaic_error(e: MosaicError) -> ApiError:
    if isinstance(e, UnknownCategoryError):
        return InvalidRequest(str(e), param="safety_modules", code="unknown_module")
    return InvalidRequest(str(e), code="invalid_request")


def _describe_validation(err: Any) -> str:
    loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
    return f"{loc}: {err.get('msg')}" if loc else str(err.get("msg"))


def _error_payload(e: ApiError | ErrorBody) -> dict[str, Any]:
    """The one error shape, OpenAI's."""
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def _error_response(e: ApiError) -> JSONResponse:
    body = _error_payload(e)
    headers = {"Retry-After": str(max(1, round(e.retry_after_s)))} if e.retry_after_s is not None else None
    return JSONResponse(body, status_code=e.status, headers=headers)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's 422 as OpenAI's 400: malformed JSON, missing/unknown fields, wrong types, out-of-range values."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return InvalidRequest(
            f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", code="invalid_json"
        )
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if not loc and first.get("type") == "model_attributes_type":
        return InvalidRequest("the request body must be a JSON object (Content-Type: application/json)", code="invalid_json")
    msg = "; ".join(_describe_validation(e) for e in errors[:5])
    kind = str(first.get("type", ""))
    code = (
        "unknown_parameter"
        if kind == "extra_forbidden"
        else "invalid_type"
        if kind.endswith(("_type", "_parsing"))
        else "invalid_value"
    )
    return InvalidRequest(msg or "invalid request", param=".".join(loc) or None, code=code)
