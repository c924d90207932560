"""Observing a supervisor: Prometheus metrics (``Metrics``, ``serve_metrics``), OpenTelemetry
traces (``Tracing``) and the access log (``AccessLog``), each an observer to pass to
``open_supervisor(config, observers=[...])``."""

from ._access_log import FORMATS as FORMATS
from ._access_log import AccessLog as AccessLog
from ._access_log import health_line as health_line
from ._listener import serve_metrics as serve_metrics
from ._metrics import HEALTH_VALUES as HEALTH_VALUES
from ._metrics import OTHER as OTHER
from ._metrics import Metrics as Metrics
from ._tracing import Tracing as Tracing

__all__ = [
    "FORMATS",
    "HEALTH_VALUES",
    "OTHER",
    "AccessLog",
    "Metrics",
    "Tracing",
    "health_line",
    "serve_metrics",
]
