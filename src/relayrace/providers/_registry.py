"""The wire formats relayrace speaks. Adding a provider is one module and one line here."""

from __future__ import annotations

from . import _anthropic, _gemini, _openai
from ._format import WireFormat

#: format name → the format.
FORMATS: dict[str, WireFormat] = {
    _openai.NAME: _openai.FORMAT,
    _anthropic.NAME: _anthropic.FORMAT,
    _gemini.NAME: _gemini.FORMAT,
}
