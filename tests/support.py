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


