"""The network surfaces: a websocket streaming endpoint and an OpenAI-compatible HTTP endpoint,
both served from one supervisor by ``serve``."""

from ._serve import Server as Server
from ._serve import serve as serve
from ._settings import ServerSettings as ServerSettings

__all__ = ["Server", "ServerSettings", "serve"]
