"""``StateConfig``: the ``[state]`` table — which backend holds the state shared between
processes, and how it is reached."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import attrs

from .._errors import ConfigError
from .._table import Table

BACKENDS = ("local", "redis")
URL_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")
#: what ``state.url`` must be, in errors
_URL_EXPECTED = (
    "a URL starting redis://, rediss:// or unix://, redis+sentinel://host:port[,host:port]"
    "/service[/db] or redis+cluster://host:port[,host:port]"
)
#: a Sentinel's port when the URL names none
SENTINEL_PORT = 26379


@attrs.frozen(kw_only=True)
class SentinelURL:
    """A ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]`` URL:
    the Sentinels to ask, the service (the primary's name) whose primary to use, and the
    primary's credentials and database (the Sentinels are reached without credentials)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    db: int = 0


@attrs.frozen(kw_only=True)
class ClusterURL:
    """A ``redis+cluster://[[user]:password@]host[:port][,host[:port]...]`` URL: the nodes to
    start from (the client learns the others) and the credentials."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)


def _hosts_and_path(url: str, default_port: int) -> tuple[list[tuple[str, int]], str, str, str]:
    """``host[:port],...``, the path after them, the user and the password of a URL that names
    several hosts. Raises ``ValueError`` (never naming the URL)."""
    rest = url.split("://", 1)[1]
    where, _, path = rest.partition("/")
    credentials, _, hosts = where.rpartition("@")
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    found = []
    for host in hosts.split(","):
        name, colon, port = host.rpartition(":") if ":" in host else (host, "", "")
        if not name or (colon and not port.isdigit()):
            raise ValueError("each host is host or host:port")
        found.append((name, int(port) if colon else default_port))
    return found, path, username, password


def parse_cluster_url(url: str) -> ClusterURL:
    """Read a ``redis+cluster://`` URL. Raises ``ValueError`` naming what is wrong (never the
    URL itself: it may carry a password)."""
    nodes, path, username, password = _hosts_and_path(url, 6379)
    if path:
        raise ValueError("a cluster has no databases: the URL has no path")
    return ClusterURL(nodes=tuple(nodes), username=username or None, password=password or None)


def parse_sentinel_url(url: str) -> SentinelURL:
    """Read a ``redis+sentinel://`` URL. Raises ``ValueError`` naming what is wrong (never the
    URL itself: it may carry a password)."""
    sentinels, path, username, password = _hosts_and_path(url, SENTINEL_PORT)
    service, _, db = path.partition("/")
    if not service:
        raise ValueError("the URL's path names the service (the Sentinels' name of the primary)")
    if db and not db.isdigit():
        raise ValueError("the database after the service is a number")
    return SentinelURL(
        sentinels=tuple(sentinels),
        service=service,
        username=username or None,
        password=password or None,
        db=int(db or 0),
    )


def _url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as ``state.url`` (never echoing it), or ``None``."""
    scheme = urlsplit(url).scheme
    if scheme not in URL_SCHEMES:
        return f"a URL with scheme {scheme!r}"
    if scheme in ("redis+sentinel", "redis+cluster"):
        try:
            (parse_sentinel_url if scheme == "redis+sentinel" else parse_cluster_url)(url)
        except ValueError as exc:
            return f"a {scheme}:// URL where {exc}"
    return None


def _check_url(
    instance: StateConfig, attribute: attrs.Attribute[str | None], value: str | None
) -> None:
    if value is None:
        if instance.backend == "redis":
            raise ConfigError(
                "state.url",
                f'{_URL_EXPECTED} when backend = "redis"',
                show_got=False,
            )
        return
    problem = _url_problem(value)
    if problem is not None:  # never echo the URL: it may carry a password
        raise ConfigError("state.url", _URL_EXPECTED, problem)


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
    if url is not None and _url_problem(url) is not None:
        url = table.mistake(table.at("url"), _URL_EXPECTED, show_got=False, fallback=None)
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
