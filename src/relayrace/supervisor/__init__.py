"""The supervisor: routing, the failover loop, streaming to callers, actor supervision."""

from ._ledger import SupervisorStatistics as SupervisorStatistics
from ._stream import RequestStream as RequestStream
from ._supervisor import Supervisor as Supervisor
from ._supervisor import open_supervisor as open_supervisor

__all__ = ["RequestStream", "Supervisor", "SupervisorStatistics", "open_supervisor"]
