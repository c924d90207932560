"""``GeminiClient``: the Gemini API (Google AI Studio's ``generativelanguage``).

``POST {base_url}/{version}/models/{model}:generateContent`` (whole) or
``:streamGenerateContent?alt=sse`` (streamed), with the key in ``x-goog-api-key`` (never in
the URL: URLs end up in error messages). Embeddings (``embed``): ``:batchEmbedContents``
(``relayrace.providers.embeddings``). The wire format (and how an OpenAI-style request is
translated) is ``relayrace.providers.gemini``.
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Any, Unpack

from .._client import Capabilities, ClientCall
from ..providers import GeminiReader, Reader, embeddings, gemini
from ._base import ClientOptions, HTTPProviderClient, options_from_table

if TYPE_CHECKING:
    from .._table import Table

GEMINI_BASE_URL = "https://generativelanguage.googleapis.com"
GEMINI_API_VERSION = gemini.API_VERSION


class GeminiClient(HTTPProviderClient):
    """A client for the Gemini API.

    Args:
        api_version: the path segment before ``models/`` (``v1beta``).
        max_tokens: ``maxOutputTokens`` to send when the request sets no limit itself.
        options: those of ``HTTPProviderClient``. ``base_url`` is the API root, without the
            version; ``api_key`` is sent as ``x-goog-api-key``; ``extra_body`` may carry
            ``safetySettings``; ``accepts_continuation`` is off by default (Gemini does not
            promise to continue a trailing ``model`` turn).

    Raises:
        ValueError: an argument is out of range.
    """

    label = "gemini"
    default_capabilities = Capabilities(n=False, logprobs=False)
    default_base_url = GEMINI_BASE_URL

    def __init__(
        self,
        *,
        api_version: str = GEMINI_API_VERSION,
        max_tokens: int | None = None,
        **options: Unpack[ClientOptions],
    ):
        self.api_version = api_version.strip("/")
        self.max_tokens = max_tokens
        super().__init__(**options)

    @classmethod
    def from_table(
        cls, table: Table, *, max_connections: int = 64, connect_timeout: float = 5.0
    ) -> GeminiClient:
        """Build from a provider's config table.

        Keys: ``base_url``, ``api_key_env``, ``api_version``, ``max_tokens``, ``headers``,
        ``query``, ``extra_body``.

        Raises:
            ConfigError: naming the key and what was expected.
        """
        options = options_from_table(
            table,
            base_url=GEMINI_BASE_URL,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
        )
        client = cls(
            api_version=table.text("api_version", GEMINI_API_VERSION),
            max_tokens=table.integer("max_tokens", None, minimum=1),
            **options,
        )
        table.done()
        return client

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        return {"x-goog-api-key": api_key} if api_key else {}

    def endpoint(self, call: ClientCall) -> str:
        path = gemini.path(call.upstream_model, stream=call.stream, api_version=self.api_version)
        return f"{self.base_url}{path}"

    def probe_url(self, model: str | None) -> str | None:
        # The deployment's own entry where the model is known (it proves the model exists).
        if model is None:
            return f"{self.base_url}/{self.api_version}/models"
        name = urllib.parse.quote(model.removeprefix("models/"), safe="")
        return f"{self.base_url}/{self.api_version}/models/{name}"

    def payload(self, call: ClientCall) -> dict[str, Any]:
        return gemini.payload(
            call.request,
            prefill=call.prefill,
            extra_body=self.extra_body,
            max_tokens=self.max_tokens,
        )

    def reader(self, call: ClientCall) -> Reader:
        return GeminiReader(call.upstream_model)

    def embed_request(self, call: ClientCall) -> tuple[str, dict[str, Any]] | None:
        assert call.embed is not None
        path = embeddings.gemini_path(call.upstream_model, api_version=self.api_version)
        # Not ``extra_body``: it holds chat fields (``safetySettings``), refused here.
        body = embeddings.gemini_payload(
            call.embed.input, model=call.upstream_model, dimensions=call.embed.dimensions
        )
        return f"{self.base_url}{path}", body

    def embed_reply(self, body: Any, call: ClientCall) -> embeddings.Answer:
        assert call.embed is not None
        return embeddings.gemini_reply(
            body, count=len(call.embed.input), dimensions=call.embed.dimensions
        )
