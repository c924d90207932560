"""Provider actors and the provider clients they drive."""

from .._client import ClientCall as ClientCall
from .._client import Completion as Completion
from .._client import ProviderClient as ProviderClient
from .._client import Sink as Sink
from ._actor import Emit as Emit
from ._actor import EmitNowait as EmitNowait
from ._actor import EmitTools as EmitTools
from ._actor import Job as Job
from ._actor import ProviderActor as ProviderActor
from ._anthropic import AnthropicClient as AnthropicClient
from ._gemini import GeminiClient as GeminiClient
from ._health import HealthSnapshot as HealthSnapshot
from ._health import State as State
from ._openai import OpenAIClient as OpenAIClient
from ._transport import POOL_SHARD as POOL_SHARD
from ._transport import ShardedTransport as ShardedTransport
from ._transport import sharded_transport as sharded_transport

__all__ = [
    "POOL_SHARD",
    "AnthropicClient",
    "ClientCall",
    "Completion",
    "Emit",
    "EmitNowait",
    "EmitTools",
    "GeminiClient",
    "HealthSnapshot",
    "Job",
    "OpenAIClient",
    "ProviderActor",
    "ProviderClient",
    "ShardedTransport",
    "Sink",
    "State",
    "sharded_transport",
]
