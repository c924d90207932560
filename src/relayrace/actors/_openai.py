"""``OpenAIClient``: OpenAI chat completions and embeddings, and every server that speaks them.

``POST {base_url}/chat/completions``; the wire format is ``relayrace.providers.openai``.
Embeddings (``embed``): ``POST {base_url}/embeddings`` (``relayrace.providers.embeddings``).
Works for OpenAI, Azure OpenAI (``auth="api-key"`` and ``query={"api-version": …}``) and any
OpenAI-compatible server (vLLM, Ollama, OpenRouter, LiteLLM…) by its base URL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Unpack

from .._client import Capabilities, ClientCall
from ..providers import OpenAIReader, Reader, embeddings, openai
from ._base import ClientOptions, HTTPProviderClient, options_from_table

if TYPE_CHECKING:
    from .._table import Table

OPENAI_BASE_URL = "https://api.openai.com/v1"

AUTH_MODES = ("bearer", "api-key")


class OpenAIClient(HTTPProviderClient):
    """A client for OpenAI-compatible chat completions.

    Args:
        auth: how the key is sent: ``bearer`` (``Authorization: Bearer …``) or ``api-key``
            (Azure's ``api-key`` header).
        max_tokens: ``max_tokens`` to send when the request sets no limit itself.
        stream_usage: ask for the usage at the end of a stream (``stream_options``); turn off
            for servers that reject the option.
        options: those of ``HTTPProviderClient``. ``base_url`` is the API root, up to and
            without ``/chat/completions`` (``https://api.openai.com/v1``,
            ``http://localhost:11434/v1``, an Azure deployment URL
            ``https://NAME.openai.azure.com/openai/deployments/DEPLOYMENT``);
            ``accepts_continuation`` is off by default (OpenAI answers afresh).

    Raises:
        ValueError: an argument is out of range.
    """

    label = "openai"
    default_capabilities = Capabilities()
    default_base_url = OPENAI_BASE_URL

    def __init__(
        self,
        *,
        auth: Literal["bearer", "api-key"] = "bearer",
        max_tokens: int | None = None,
        stream_usage: bool = True,
        **options: Unpack[ClientOptions],
    ):
        if auth not in AUTH_MODES:
            raise ValueError(f"auth: expected one of {', '.join(AUTH_MODES)}")
        self.auth = auth
        self.max_tokens = max_tokens
        self.stream_usage = stream_usage
        super().__init__(**options)

    @classmethod
    def from_table(
        cls,
        table: Table,
        *,
        base_url: str = OPENAI_BASE_URL,
        max_connections: int = 64,
        connect_timeout: float = 5.0,
    ) -> OpenAIClient:
        """Build from a provider's config table.

        Keys: ``base_url`` (default: ``base_url``), ``api_key_env``, ``auth`` (``bearer`` /
        ``api-key``), ``headers``, ``query``, ``extra_body``, ``max_tokens``, ``stream_usage``.

        Raises:
            ConfigError: naming the key and what was expected.
        """
        options = options_from_table(
            table,
            base_url=base_url,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
        )
        client = cls(
            auth=table.choice("auth", AUTH_MODES, "bearer"),
            max_tokens=table.integer("max_tokens", None, minimum=1),
            stream_usage=table.flag("stream_usage", True),
            **options,
        )
        table.done()
        return client

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        if not api_key:
            return {}
        if self.auth == "bearer":
            return {"authorization": f"Bearer {api_key}"}
        return {"api-key": api_key}

    def endpoint(self, call: ClientCall) -> str:
        return f"{self.base_url}{openai.PATH}"

    def probe_url(self, model: str | None) -> str | None:
        return f"{self.base_url}/models"

    def payload(self, call: ClientCall) -> dict[str, Any]:
        return openai.payload(
            call.request,
            model=call.upstream_model,
            stream=call.stream,
            prefill=call.prefill,
            extra_body=self.extra_body,
            max_tokens=self.max_tokens,
            stream_usage=self.stream_usage,
        )

    def reader(self, call: ClientCall) -> Reader:
        return OpenAIReader(call.upstream_model)

    def embed_request(self, call: ClientCall) -> tuple[str, dict[str, Any]] | None:
        assert call.embed is not None
        # Not ``extra_body``: it holds chat fields, which an embeddings endpoint may refuse.
        body = embeddings.openai_payload(
            call.embed.input, model=call.upstream_model, dimensions=call.embed.dimensions
        )
        return f"{self.base_url}{embeddings.OPENAI_PATH}", body

    def embed_reply(self, body: Any, call: ClientCall) -> embeddings.Answer:
        assert call.embed is not None
        return embeddings.openai_reply(
            body, count=len(call.embed.input), dimensions=call.embed.dimensions
        )
