"""The state shared between relayrace processes: benches, probe leases, failure counts, the
retry budget, rate-limit counters and learned limits, cache-affinity pins.

``open_state(config)`` opens the backend a ``StateConfig`` names: ``LocalState`` (in-process,
the default) or ``RedisState`` (through Redis/Valkey, with coredis — imported only then).
Routing reads ``backend.mirror`` synchronously; nothing on the request path waits on Redis.
"""

from typing import TYPE_CHECKING, Any

from ._backend import EventHook as EventHook
from ._backend import LocalState as LocalState
from ._backend import StateBackend as StateBackend
from ._config import ClusterURL as ClusterURL
from ._config import SentinelURL as SentinelURL
from ._config import StateConfig as StateConfig
from ._config import parse_cluster_url as parse_cluster_url
from ._config import parse_sentinel_url as parse_sentinel_url
from ._config import parse_state_config as parse_state_config
from ._mirror import Mirror as Mirror
from ._mirror import RetryWindow as RetryWindow
from ._model import BenchRecord as BenchRecord
from ._model import Deployment as Deployment
from ._model import LearnedLimits as LearnedLimits
from ._model import Pin as Pin
from ._model import ProbeLease as ProbeLease
from ._model import StateEvent as StateEvent
from ._model import StateEventKind as StateEventKind
from ._model import StateStatistics as StateStatistics
from ._model import Usage as Usage
from ._model import merge_bench as merge_bench
from ._open import open_state as open_state

if TYPE_CHECKING:
    from ._redis import RedisState as RedisState
    from ._redis import open_redis_state as open_redis_state

__all__ = [
    "BenchRecord",
    "ClusterURL",
    "Deployment",
    "EventHook",
    "LearnedLimits",
    "LocalState",
    "Mirror",
    "Pin",
    "ProbeLease",
    "RedisState",
    "RetryWindow",
    "SentinelURL",
    "StateBackend",
    "StateConfig",
    "StateEvent",
    "StateEventKind",
    "StateStatistics",
    "Usage",
    "merge_bench",
    "open_redis_state",
    "open_state",
    "parse_cluster_url",
    "parse_sentinel_url",
    "parse_state_config",
]


def __getattr__(name: str) -> Any:
    # RedisState needs coredis, an optional extra: imported on first use only.
    if name in ("RedisState", "open_redis_state"):
        from . import _redis

        return getattr(_redis, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
