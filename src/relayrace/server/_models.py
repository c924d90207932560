"""The model objects of ``GET /v1/models`` and ``GET /v1/models/{id}``: one per route."""

from __future__ import annotations

from typing import Any

from .. import Supervisor

#: the path under which one model is retrieved by its id (a route's name).
MODEL_PATH = "/v1/models/"


def model_objects(sup: Supervisor) -> list[dict[str, Any]]:
    """Every route as an OpenAI ``model`` object (with its chain and strategy)."""
    return [_model(name, route.chain, route.strategy) for name, route in sup.routes.items()]


def model_object(sup: Supervisor, model_id: str) -> dict[str, Any] | None:
    """The route named ``model_id`` as an OpenAI ``model`` object, or ``None``."""
    route = sup.routes.get(model_id)
    return None if route is None else _model(model_id, route.chain, route.strategy)


def _model(name: str, chain: Any, strategy: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "relayrace",
        "chain": list(chain),
        "strategy": strategy,
    }
