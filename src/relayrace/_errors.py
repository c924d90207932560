"""The exceptions relayrace raises.

Every exception derives from one root::

    RelayraceError
    ├── ConfigError        a configuration is invalid (raised while it is read, before anything starts)
    │   └── ConfigErrors   several mistakes at once, each a ``ConfigError`` in ``problems``
    ├── BadRequest         a request is invalid (raised before any provider is called)
    ├── RequestFailed      a valid request could not be served; carries the deciding ``Failure``
    │                      and every attempt and decision made on the way
    └── ProviderError      raised by a provider client inside an actor to report a classified
                           failure; the supervisor turns it into an attempt and never lets it
                           reach a caller

``trio.Cancelled`` is never wrapped: a caller that cancels sees its own cancellation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._failure import Failure
    from ._record import Attempt, Decision


class RelayraceError(Exception):
    """The root of every exception relayrace raises on purpose."""


class ConfigError(RelayraceError):
    """A configuration is invalid.

    Raised when a ``Config`` is built, read from a dict or from a TOML file. ``path`` is the
    dotted path of the offending key (``providers[1].max_concurrency``), ``expected`` says what
    would have been accepted; a ``hint`` (a misspelt key's nearest known key) is added to the
    message as ``(did you mean 'max_concurrency'?)``.
    """

    def __init__(
        self,
        path: str,
        expected: str,
        got: object = None,
        *,
        show_got: bool = True,
        hint: str | None = None,
    ):
        self.path = path
        self.expected = expected
        message = f"{path}: expected {expected}" if path else f"expected {expected}"
        if show_got:
            message += f", got {_describe(got)}"
        if hint is not None:
            message += f" (did you mean {hint!r}?)"
        super().__init__(message)

    @property
    def problems(self) -> tuple[ConfigError, ...]:
        """Every mistake this error reports, one ``ConfigError`` each (here: itself)."""
        return (self,)


class ConfigErrors(ConfigError):
    """Several mistakes in one configuration, found in one reading and raised together.

    ``problems`` holds one ``ConfigError`` per mistake, in the order they were found; the
    message has one line per mistake. ``path`` and ``expected`` are the first one's.
    """

    def __init__(self, problems: Sequence[ConfigError]):
        flat = tuple(one for problem in problems for one in problem.problems)
        if len(flat) < 2:
            raise ValueError("ConfigErrors carries at least two problems")
        RelayraceError.__init__(self, "\n".join(str(problem) for problem in flat))
        self.path = flat[0].path
        self.expected = flat[0].expected
        self._problems = flat

    @property
    def problems(self) -> tuple[ConfigError, ...]:
        return self._problems


def raise_config_errors(problems: Sequence[ConfigError]) -> None:
    """Raise nothing if ``problems`` is empty, the one ``ConfigError``, or ``ConfigErrors``.

    Raises:
        ConfigError: one problem; ``ConfigErrors`` for more.
    """
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ConfigErrors(problems)


class BadRequest(RelayraceError):
    """A request is invalid; raised before any provider is called.

    ``field`` names the offending part of the request (``messages[0].role``).
    """

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)


class RequestFailed(RelayraceError):
    """A valid request ended without an answer.

    Attributes:
        failure: the failure that decided the outcome (its ``category`` says why).
        attempts: one record per try, in order.
        decisions: every retry / failover / stop decision, with the rule that matched.
    """

    def __init__(
        self,
        failure: Failure,
        attempts: Sequence[Attempt] = (),
        decisions: Sequence[Decision] = (),
        *,
        request_id: int | None = None,
    ):
        self.failure = failure
        self.attempts = tuple(attempts)
        self.decisions = tuple(decisions)
        self.request_id = request_id
        super().__init__(f"{failure.category.value}: {failure.message}")

    @property
    def category(self) -> str:
        return self.failure.category.value


class ProviderError(RelayraceError):
    """Raised by a provider client to report a classified failure of one attempt."""

    def __init__(self, failure: Failure):
        self.failure = failure
        super().__init__(f"{failure.category.value}: {failure.message}")


def _describe(value: object) -> str:
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return f"{type(value).__name__} {text!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"
