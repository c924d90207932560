"""Token counts of an answer (its own module so that ``_record``'s ``Attempt`` can carry them
without importing ``_values``)."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen(kw_only=True)
class Usage:
    """Token counts as the provider reported them (0 where it reported none).

    Attributes:
        prompt_tokens: the whole prompt, cached parts included.
        completion_tokens: the whole output, reasoning included.
        cached_tokens: prompt tokens read from the provider's cache (OpenAI's
            ``cached_tokens``, Anthropic's ``cache_read_input_tokens``, Gemini's
            ``cachedContentTokenCount``).
        reasoning_tokens: output tokens spent thinking (OpenAI's ``reasoning_tokens``,
            Gemini's ``thoughtsTokenCount``).
        cache_creation_tokens: prompt tokens written to the cache (Anthropic).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_creation_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's ``usage`` object (details only where a count is reported)."""
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cached_tokens:
            out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        if self.reasoning_tokens:
            out["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return out
