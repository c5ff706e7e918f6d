"""Errors the OpenAI front door answers with: an HTTP status plus OpenAI's error object fields."""

from __future__ import annotations

from mgm_ref.errors import MGMError


class APIError(MGMError):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def too_large(message: str, param: str | None = None) -> APIError:
    return APIError(413, message, "invalid_request_error", param, "request_too_large")


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(404, message, "invalid_request_error", param, "model_not_found")


def unavailable(message: str) -> APIError:
    return APIError(503, message, "service_unavailable", None, "model_not_ready")
