"""Provider actors and the provider clients they drive."""

from ._actor import ProviderActor as ProviderActor
from ._client import ClientCall as ClientCall
from ._client import Completion as Completion
from ._client import ProviderClient as ProviderClient
from ._client import Sink as Sink
from ._health import HealthSnapshot as HealthSnapshot
from ._health import State as State

__all__ = [
    "ClientCall",
    "Completion",
    "HealthSnapshot",
    "ProviderActor",
    "ProviderClient",
    "Sink",
    "State",
]
