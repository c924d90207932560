"""What a wire format's reader raises: the providers' vocabulary for a response that is an
error (``UpstreamErrorBody``) or that cannot be read (``MalformedStream``). The client's error
boundary (``relayrace.actors``) maps both to a classified ``ProviderError``."""

from __future__ import annotations

from typing import Any


class UpstreamErrorBody(Exception):
    """An error inside a 200 response: an SSE ``error`` event, an ``{"error": …}`` chunk, a
    safety block or a content-filter finish.

    ``body`` is given to ``classify`` as the error body.
    """

    def __init__(self, body: Any):
        super().__init__("error inside the response")
        self.body = body


class MalformedStream(Exception):
    """The response cannot be read: an SSE event that is not JSON, a body that ends before its
    finish reason, or data of the wrong shape."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def check_text(text: str, what: str) -> str:
    """``text``, if it can leave the process (be encoded as UTF-8): a lone surrogate, which a
    JSON ``\\ud800`` escape decodes to, cannot, and would fail whoever writes it next.

    Raises:
        MalformedStream: ``malformed_text``, naming ``what`` (never quoting the text).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedStream(
            "malformed_text", f"{what} that is not valid Unicode (a lone surrogate)"
        ) from None
    return text
