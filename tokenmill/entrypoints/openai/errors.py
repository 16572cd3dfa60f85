"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with the right HTTP status."""

from __future__ import annotations

from http import HTTPStatus


class OpenAIError(Exception):
    """A request the server refuses; message says what was wrong and how to fix it."""

    def __init__(
        self,
        message: str,
        status: int = HTTPStatus.BAD_REQUEST,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.type = type or _DEFAULT_TYPES.get(self.status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_DEFAULT_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(message, HTTPStatus.BAD_REQUEST, param=param, code=code)


def unavailable(message: str, code: str, retry_after: int = 1) -> OpenAIError:
    return OpenAIError(message, HTTPStatus.SERVICE_UNAVAILABLE, code=code,
                       headers={"Retry-After": str(max(1, int(retry_after)))})
