"""Provider actors and the provider clients they drive."""

from .._client import PROBE_MODES as PROBE_MODES
from .._client import ClientCall as ClientCall
from .._client import Completion as Completion
from .._client import ProbingClient as ProbingClient
from .._client import ProviderClient as ProviderClient
from .._client import Sink as Sink
from .._ratelimit import RateLimits as RateLimits
from .._ratelimit import read_rate_limits as read_rate_limits
from ._actor import ProviderActor as ProviderActor
from ._anthropic import AnthropicClient as AnthropicClient
from ._deployments import DEFAULT_MAX_DEPLOYMENTS as DEFAULT_MAX_DEPLOYMENTS
from ._deployments import Deployments as Deployments
from ._deployments import account_level as account_level
from ._gemini import GeminiClient as GeminiClient
from ._h11 import H11Transport as H11Transport
from ._health import DeploymentSnapshot as DeploymentSnapshot
from ._health import HealthSnapshot as HealthSnapshot
from ._health import State as State
from ._job import Emit as Emit
from ._job import EmitNowait as EmitNowait
from ._job import EmitTools as EmitTools
from ._job import Job as Job
from ._openai import OpenAIClient as OpenAIClient
from ._shared import UNSHARED as UNSHARED
from ._shared import SharedHealth as SharedHealth
from ._shared import Unshared as Unshared
from ._transport import POOL_SHARD as POOL_SHARD
from ._transport import ShardedTransport as ShardedTransport
from ._transport import sharded_transport as sharded_transport

__all__ = [
    "UNSHARED",
    "SharedHealth",
    "Unshared",
    "DEFAULT_MAX_DEPLOYMENTS",
    "POOL_SHARD",
    "PROBE_MODES",
    "AnthropicClient",
    "ClientCall",
    "Completion",
    "DeploymentSnapshot",
    "Deployments",
    "Emit",
    "EmitNowait",
    "EmitTools",
    "GeminiClient",
    "H11Transport",
    "HealthSnapshot",
    "Job",
    "OpenAIClient",
    "ProbingClient",
    "ProviderActor",
    "ProviderClient",
    "RateLimits",
    "ShardedTransport",
    "Sink",
    "State",
    "account_level",
    "read_rate_limits",
    "sharded_transport",
]
