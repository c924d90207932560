"""Moved to ``relayrace._client`` (the contract between config, actors and clients).

Kept as a re-export only while ``supervisor`` and ``testing._scripted`` still import it from
here; they should import ``relayrace.actors`` (public) instead, and this module then goes.
"""

from .._client import ClientCall as ClientCall
from .._client import Completion as Completion
from .._client import ProviderClient as ProviderClient
from .._client import Sink as Sink
