"""The supervisor: routing, the failover loop, streaming to callers, actor supervision."""

from ._ledger import SupervisorStatistics as SupervisorStatistics
from ._stream import STREAM_BUFFER as STREAM_BUFFER
from ._stream import RequestStream as RequestStream
from ._supervisor import MAX_RESTARTS as MAX_RESTARTS
from ._supervisor import RESTART_WINDOW as RESTART_WINDOW
from ._supervisor import Supervisor as Supervisor
from ._supervisor import open_supervisor as open_supervisor

__all__ = [
    "MAX_RESTARTS",
    "RESTART_WINDOW",
    "STREAM_BUFFER",
    "RequestStream",
    "Supervisor",
    "SupervisorStatistics",
    "open_supervisor",
]
