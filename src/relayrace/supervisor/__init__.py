"""The supervisor: routing, the failover loop, streaming to callers, actor supervision."""

from ._latency import Estimate as Estimate
from ._latency import LatencyBook as LatencyBook
from ._latency import Pick as Pick
from ._latency import power_of_two as power_of_two
from ._ledger import SupervisorStatistics as SupervisorStatistics
from ._observer import SURFACES as SURFACES
from ._observer import Observer as Observer
from ._observer import RequestInfo as RequestInfo
from ._observer import RequestTiming as RequestTiming
from ._observer import SupervisorView as SupervisorView
from ._reload import Reloaded as Reloaded
from ._stream import STREAM_BUFFER as STREAM_BUFFER
from ._stream import RequestStream as RequestStream
from ._supervisor import MAX_RESTARTS as MAX_RESTARTS
from ._supervisor import RESTART_WINDOW as RESTART_WINDOW
from ._supervisor import Supervisor as Supervisor
from ._supervisor import open_supervisor as open_supervisor

__all__ = [
    "Estimate",
    "LatencyBook",
    "MAX_RESTARTS",
    "Observer",
    "Pick",
    "RESTART_WINDOW",
    "Reloaded",
    "RequestInfo",
    "RequestStream",
    "RequestTiming",
    "STREAM_BUFFER",
    "SURFACES",
    "Supervisor",
    "SupervisorStatistics",
    "SupervisorView",
    "open_supervisor",
    "power_of_two",
]
