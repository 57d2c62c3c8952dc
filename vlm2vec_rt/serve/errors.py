"""`APIError`: an HTTP error in the OpenAI error shape, {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

# OpenAI's error types by status: clients (and the openai package's exception classes) key on these
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    499: "client_closed_request",
    500: "server_error",
    503: "server_overloaded",
}


class APIError(Exception):
    """An error answer: status, a message that names the problem, the request field at fault (`param`,
    e.g. "input[2].image"), a short machine-readable `code` and extra headers (Retry-After, WWW-Authenticate)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body."""
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }
