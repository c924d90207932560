"""``StateConfig``: the ``[state]`` table — which backend holds the state shared between
processes, and how it is reached."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import attrs

from .._errors import ConfigError
from .._table import Table

BACKENDS = ("local", "redis")
URL_SCHEMES = ("redis", "rediss", "unix")


def _check_url(
    instance: StateConfig, attribute: attrs.Attribute[str | None], value: str | None
) -> None:
    if value is None:
        if instance.backend == "redis":
            raise ConfigError(
                "state.url",
                'a redis://, rediss:// or unix:// URL when backend = "redis"',
                show_got=False,
            )
        return
    scheme = urlsplit(value).scheme
    if scheme not in URL_SCHEMES:
        # Never echo the URL: it may carry a password.
        raise ConfigError(
            "state.url",
            "a URL starting redis://, rediss:// or unix://",
            f"a URL with scheme {scheme!r}",
        )


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ConfigError(f"state.{attribute.name}", "a positive number", value)


@attrs.frozen(kw_only=True)
class StateConfig:
    """Where the state shared between relayrace processes lives.

    Attributes:
        backend: ``"local"`` (in-process: today's behaviour, the default) or ``"redis"``.
        url: the Redis/Valkey URL (``redis://``, ``rediss://``, ``unix://``); required for
            ``"redis"``. Never logged: it may carry a password.
        prefix: the prefix of every key and of the pub/sub channel; processes that share a
            prefix share state.
        operation_timeout: seconds one Redis operation may take before the backend counts
            Redis as away (never a request's time: requests read the local mirror).
        connect_timeout: seconds to connect.
        sync_interval: seconds between full reads of the shared state (the backstop behind
            pub/sub; also how soon a paused Redis is noticed when nothing is written).
        backoff_min, backoff_max: the reconnection delay, doubling from min to max.
        queue_size: writes waiting for Redis; past it a write is dropped (the local mirror
            still has it, and the next full read re-publishes benches and pins).
    """

    backend: str = attrs.field(default="local", validator=attrs.validators.in_(BACKENDS))
    url: str | None = attrs.field(default=None, validator=_check_url, repr=False)
    prefix: str = "relayrace"
    operation_timeout: float = attrs.field(default=0.25, validator=_positive)
    connect_timeout: float = attrs.field(default=1.0, validator=_positive)
    sync_interval: float = attrs.field(default=2.0, validator=_positive)
    backoff_min: float = attrs.field(default=0.1, validator=_positive)
    backoff_max: float = attrs.field(default=5.0, validator=_positive)
    queue_size: int = attrs.field(default=10_000, validator=_positive)

    @property
    def is_default(self) -> bool:
        return self == StateConfig()


def parse_state_config(table: Table) -> StateConfig:
    """Read a ``[state]`` table.

    Raises:
        ConfigError: a key is wrong (its dotted path named), or the table has a key nobody
            reads; with a ``Problems`` collector on ``table`` the mistakes are recorded there
            and the defaults used.
    """
    default = StateConfig()
    backend = table.choice("backend", BACKENDS, default.backend)
    url = table.text("url", None)
    if url is not None and urlsplit(url).scheme not in URL_SCHEMES:
        url = table.mistake(
            table.at("url"),
            "a URL starting redis://, rediss:// or unix://",
            show_got=False,
            fallback=None,
        )
    if backend == "redis" and url is None:
        backend = table.mistake(
            table.at("url"), 'a URL when backend = "redis"', show_got=False, fallback="local"
        )
    prefix = table.text("prefix", default.prefix)
    values = {
        name: table.number(name, getattr(default, name), positive=True)
        for name in (
            "operation_timeout",
            "connect_timeout",
            "sync_interval",
            "backoff_min",
            "backoff_max",
        )
    }
    queue_size = table.integer("queue_size", default.queue_size, minimum=1)
    table.done()
    if values["backoff_max"] < values["backoff_min"]:
        values["backoff_max"] = table.mistake(
            table.at("backoff_max"),
            "a number ≥ backoff_min",
            values["backoff_max"],
            fallback=values["backoff_min"],
        )
    return StateConfig(backend=backend, url=url, prefix=prefix, queue_size=queue_size, **values)
