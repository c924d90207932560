"""``AnthropicClient``: the Anthropic Messages API.

``POST {base_url}/v1/messages`` with ``x-api-key`` and ``anthropic-version``; the wire format
(and how an OpenAI-style request is translated) is ``relayrace.providers.anthropic``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Unpack

from .._client import Capabilities, ClientCall
from ..providers import AnthropicReader, Reader, anthropic
from ._base import ClientOptions, HTTPProviderClient, options_from_table

if TYPE_CHECKING:
    from .._table import Table

ANTHROPIC_BASE_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = anthropic.VERSION
DEFAULT_MAX_TOKENS = anthropic.DEFAULT_MAX_TOKENS


class AnthropicClient(HTTPProviderClient):
    """A client for the Anthropic Messages API.

    Args:
        version: the ``anthropic-version`` header.
        max_tokens: the output limit sent when the request sets none (Anthropic requires one).
        options: those of ``HTTPProviderClient``. ``base_url`` is the API root, without
            ``/v1/messages``; ``api_key`` is sent as ``x-api-key``; ``headers`` may add
            ``anthropic-beta``; ``accepts_continuation`` is on by default.

    Raises:
        ValueError: an argument is out of range.
    """

    label = "anthropic"
    default_capabilities = Capabilities(
        json_schema=False, n=False, logprobs=False, embeddings=False
    )
    default_base_url = ANTHROPIC_BASE_URL
    default_accepts_continuation = True

    def __init__(
        self,
        *,
        version: str = ANTHROPIC_VERSION,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        **options: Unpack[ClientOptions],
    ):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError("max_tokens: expected a positive integer")
        self.version = version
        self.max_tokens = max_tokens
        super().__init__(**options)

    @classmethod
    def from_table(
        cls, table: Table, *, max_connections: int = 64, connect_timeout: float = 5.0
    ) -> AnthropicClient:
        """Build from a provider's config table.

        Keys: ``base_url``, ``api_key_env``, ``version``, ``max_tokens``, ``headers``,
        ``query``, ``extra_body``.

        Raises:
            ConfigError: naming the key and what was expected.
        """
        options = options_from_table(
            table,
            base_url=ANTHROPIC_BASE_URL,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
        )
        client = cls(
            version=table.text("version", ANTHROPIC_VERSION),
            max_tokens=table.integer("max_tokens", DEFAULT_MAX_TOKENS, minimum=1),
            **options,
        )
        table.done()
        return client

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        return {"x-api-key": api_key} if api_key else {}

    def fixed_headers(self) -> dict[str, str]:
        return {"anthropic-version": self.version}

    def endpoint(self, call: ClientCall) -> str:
        return f"{self.base_url}{anthropic.PATH}"

    def probe_url(self, model: str | None) -> str | None:
        return f"{self.base_url}/v1/models"

    def payload(self, call: ClientCall) -> dict[str, Any]:
        return anthropic.payload(
            call.request,
            model=call.upstream_model,
            stream=call.stream,
            prefill=call.prefill,
            extra_body=self.extra_body,
            max_tokens=self.max_tokens,
        )

    def reader(self, call: ClientCall) -> Reader:
        strip = anthropic.cuts_whitespace(call.request.messages, call.prefill)
        return AnthropicReader(call.upstream_model, strip_leading=strip)
