"""The providers' wire formats, pure: request payloads, response readers, error codes and
encoders for OpenAI, Anthropic and Gemini, their embeddings APIs (``embeddings``), and
``classify``.

Nothing here does I/O or imports trio or httpx: the clients (``relayrace.actors``), the
gateway and the mock provider (``relayrace.testing``) use these to speak each format, which is
written once. Each format is a module (``openai``, ``anthropic``, ``gemini``, re-exported
here) listed in ``FORMATS``.
"""

from . import _anthropic as anthropic
from . import _anthropic_inbound as anthropic_inbound
from . import _embeddings as embeddings
from . import _gemini as gemini
from . import _openai as openai
from ._anthropic import AnthropicReader as AnthropicReader
from ._classify import classify as classify
from ._errors import MalformedStream as MalformedStream
from ._errors import UpstreamErrorBody as UpstreamErrorBody
from ._errors import check_text as check_text
from ._format import ERROR_KINDS as ERROR_KINDS
from ._format import WireFormat as WireFormat
from ._gemini import GeminiReader as GeminiReader
from ._json import as_int as as_int
from ._json import dumps as dumps
from ._json import get as get
from ._json import parse_data_url as parse_data_url
from ._json import text_of as text_of
from ._openai import OpenAIReader as OpenAIReader
from ._reader import Reader as Reader
from ._registry import FORMATS as FORMATS
from ._sse import MAX_EVENT_BYTES as MAX_EVENT_BYTES
from ._sse import MAX_SSE_LINE_BYTES as MAX_SSE_LINE_BYTES
from ._sse import ServerSentEvent as ServerSentEvent
from ._sse import SSEDecoder as SSEDecoder
from ._sse import encode_event as encode_event

__all__ = [
    "ERROR_KINDS",
    "FORMATS",
    "MAX_EVENT_BYTES",
    "MAX_SSE_LINE_BYTES",
    "AnthropicReader",
    "GeminiReader",
    "MalformedStream",
    "OpenAIReader",
    "Reader",
    "SSEDecoder",
    "ServerSentEvent",
    "UpstreamErrorBody",
    "WireFormat",
    "anthropic",
    "anthropic_inbound",
    "as_int",
    "check_text",
    "classify",
    "dumps",
    "embeddings",
    "encode_event",
    "gemini",
    "get",
    "openai",
    "parse_data_url",
    "text_of",
]
