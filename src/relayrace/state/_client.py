"""How ``RedisState`` reaches Redis: one coredis client of ``[state] url``, straight to the
server (``redis://``, ``rediss://``, ``unix://``), to the primary a set of Sentinels names
(``redis+sentinel://``, asked again on every connection, so a failover moves us along), or to a
Redis Cluster (``redis+cluster://``: all of a prefix's keys in the slot of its hash tag)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import coredis
from coredis.connection import TCPLocation
from coredis.retry import NoRetryPolicy

from ._config import StateConfig, parse_cluster_url, parse_sentinel_url

Client = coredis.Redis[str]


@asynccontextmanager
async def redis_client(config: StateConfig) -> AsyncIterator[Client]:
    """A client of ``config.url``, open for the block; no retries of its own (a failure is
    the session's, which degrades and reconnects with backoff)."""
    assert config.url is not None
    common: dict[str, Any] = {
        "decode_responses": True,
        "retry_policy": NoRetryPolicy(),
        "connect_timeout": config.connect_timeout,
        "stream_timeout": config.operation_timeout * 4,
    }
    if config.url.startswith("redis+cluster://"):
        nodes = parse_cluster_url(config.url)
        cluster = coredis.RedisCluster(
            startup_nodes=[TCPLocation(host, port) for host, port in nodes.nodes],
            username=nodes.username,
            password=nodes.password,
            **common,
        )
        async with cluster:
            # The calls RedisState makes (scripts, pub/sub) are the same on both clients; every
            # script's keys share the prefix's hash tag, so they land in one slot.
            yield cast(Client, cluster)
        return
    if not config.url.startswith("redis+sentinel://"):
        client = coredis.Redis.from_url(config.url, **common)
        async with client:
            yield client
        return
    where = parse_sentinel_url(config.url)
    sentinel = coredis.Sentinel(
        [TCPLocation(host, port) for host, port in where.sentinels], **common
    )
    async with sentinel:
        primary = cast(
            Client,
            sentinel.primary_for(
                where.service, username=where.username, password=where.password, db=where.db
            ),
        )
        async with primary:
            yield primary
