"""relayrace: fail over LLM requests between ranked provider actors, on trio."""

from ._client import Capabilities as Capabilities
from ._config import Budgets as Budgets
from ._config import Config as Config
from ._config import Hedge as Hedge
from ._config import ProviderConfig as ProviderConfig
from ._config import Route as Route
from ._embedding import Embedding as Embedding
from ._embedding import EmbeddingsReply as EmbeddingsReply
from ._embedding import EmbedRequest as EmbedRequest
from ._errors import BadRequest as BadRequest
from ._errors import ConfigError as ConfigError
from ._errors import ConfigErrors as ConfigErrors
from ._errors import ProviderError as ProviderError
from ._errors import RelayraceError as RelayraceError
from ._errors import RequestFailed as RequestFailed
from ._events import Event as Event
from ._events import EventKind as EventKind
from ._failure import Category as Category
from ._failure import Failure as Failure
from ._loader import GatewayConfig as GatewayConfig
from ._loader import load_config as load_config
from ._loader import load_gateway as load_gateway
from ._loader import read_config as read_config
from ._loader import read_gateway as read_gateway
from ._policy import AllBenched as AllBenched
from ._policy import FailoverAction as FailoverAction
from ._policy import FailoverPolicy as FailoverPolicy
from ._policy import HealthPolicy as HealthPolicy
from ._policy import Match as Match
from ._policy import MidStream as MidStream
from ._policy import Policies as Policies
from ._policy import RetryBudgetPolicy as RetryBudgetPolicy
from ._policy import RetryPolicy as RetryPolicy
from ._policy import StreamPolicy as StreamPolicy
from ._record import Action as Action
from ._record import Attempt as Attempt
from ._record import Decision as Decision
from ._record import Outcome as Outcome
from ._record import Rule as Rule
from ._record import Scope as Scope
from ._values import Choice as Choice
from ._values import Delta as Delta
from ._values import Reply as Reply
from ._values import Request as Request
from ._values import ToolCall as ToolCall
from ._values import ToolCallDelta as ToolCallDelta
from ._values import Usage as Usage
from .actors import DeploymentSnapshot as DeploymentSnapshot
from .actors import HealthSnapshot as HealthSnapshot
from .actors import State as State
from .providers import classify as classify
from .supervisor import Observer as Observer
from .supervisor import RequestInfo as RequestInfo
from .supervisor import RequestStream as RequestStream
from .supervisor import RequestTiming as RequestTiming
from .supervisor import Supervisor as Supervisor
from .supervisor import SupervisorStatistics as SupervisorStatistics
from .supervisor import open_supervisor as open_supervisor

__all__ = [
    "Action",
    "AllBenched",
    "Attempt",
    "BadRequest",
    "Budgets",
    "Capabilities",
    "Category",
    "Choice",
    "Config",
    "ConfigError",
    "ConfigErrors",
    "Decision",
    "Delta",
    "DeploymentSnapshot",
    "EmbedRequest",
    "Embedding",
    "EmbeddingsReply",
    "Event",
    "EventKind",
    "FailoverAction",
    "FailoverPolicy",
    "Failure",
    "GatewayConfig",
    "HealthPolicy",
    "HealthSnapshot",
    "Hedge",
    "Match",
    "MidStream",
    "Observer",
    "Outcome",
    "Policies",
    "ProviderConfig",
    "ProviderError",
    "RelayraceError",
    "Reply",
    "Request",
    "RequestFailed",
    "RequestInfo",
    "RequestStream",
    "RequestTiming",
    "RetryBudgetPolicy",
    "RetryPolicy",
    "Route",
    "Rule",
    "Scope",
    "State",
    "StreamPolicy",
    "Supervisor",
    "SupervisorStatistics",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
    "classify",
    "load_config",
    "load_gateway",
    "open_supervisor",
    "read_config",
    "read_gateway",
]
