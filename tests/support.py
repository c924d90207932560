from __future__ import annotations

from typing import Any

from relayrace import Config, Policies, ProviderConfig, Request, Route
from relayrace.testing import ScriptedClient


def scripted_provider(name: str, *steps: Any, accepts_continuation: bool = False, **kwargs: Any) -> ProviderConfig:
    """A provider named ``name`` whose client follows ``steps``."""
    return ProviderConfig(
        name=name, client=ScriptedClient(steps, accepts_continuation=accepts_continuation), **kwargs
    )


def config(*providers: ProviderConfig, strategy: str = "priority", policies: Policies | None = None, **kwargs: Any) -> Config:
    """A config with one route ``m`` over ``providers`` in the given order."""
    return Config(
        providers=providers,
        routes=[Route(model="m", chain=[p.name for p in providers], strategy=strategy)],
        policies=policies or Policies(),
        **kwargs,
    )


def request(text: str = "hi", model: str = "m") -> Request:
    return Request(model, [{"role": "user", "content": text}])


def client(cfg: Config, name: str) -> ScriptedClient:
    for p in cfg.providers:
        if p.name == name:
            assert isinstance(p.client, ScriptedClient)
            return p.client
    raise KeyError(name)




#: The API key the provider clients of the over-HTTP tests send to the mock provider.
MOCK_KEY = "sk-mock-0123456789abcdef"


def mock_client(mock: Any, fmt: str, *, key: str = MOCK_KEY) -> Any:
    """A real HTTP client of wire format ``fmt`` (openai, anthropic, gemini) on the mock."""
    from relayrace.actors import AnthropicClient, GeminiClient, OpenAIClient

    if fmt == "openai":
        return OpenAIClient(base_url=f"{mock.base_url}/v1", api_key=key)
    if fmt == "anthropic":
        return AnthropicClient(base_url=mock.base_url, api_key=key)
    if fmt == "gemini":
        return GeminiClient(base_url=mock.base_url, api_key=key)
    raise ValueError(f"no wire format {fmt!r}")


def mock_config(
    mock: Any,
    *providers: tuple[str, str, str],
    budgets: Any,
    client: Any = mock_client,
) -> Config:
    """Providers ``(name, format, mock model)`` on the mock (the model tagged with the name),
    one route ``m`` over them in order, no retries, a fixed seed."""
    from relayrace import RetryPolicy

    return Config(
        providers=[
            ProviderConfig(
                name=name, client=client(mock, fmt), model=f"{model},tag={name}", budgets=budgets
            )
            for name, fmt, model in providers
        ],
        routes=[Route(model="m", chain=[name for name, _, _ in providers])],
        policies=Policies(retry=RetryPolicy(max_attempts=1)),
        seed=7,
    )
