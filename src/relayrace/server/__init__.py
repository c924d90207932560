"""The network surfaces: a websocket streaming endpoint and an OpenAI-compatible HTTP endpoint,
both served from one supervisor by ``serve``, with the probes and the admin API on the latter."""

from ._admin import Operations as Operations
from ._admin import RecentFailures as RecentFailures
from ._admin import reload_gateway as reload_gateway
from ._serve import Server as Server
from ._serve import serve as serve
from ._settings import ServerSettings as ServerSettings

__all__ = ["Operations", "RecentFailures", "Server", "ServerSettings", "reload_gateway", "serve"]
