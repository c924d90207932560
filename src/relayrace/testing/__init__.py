"""Test helpers: a scripted provider client and (with #3) a fault-injecting mock provider."""

from ._scripted import SCRIPTED_ANSWER as SCRIPTED_ANSWER
from ._scripted import Answer as Answer
from ._scripted import Crash as Crash
from ._scripted import Fail as Fail
from ._scripted import Hang as Hang
from ._scripted import RecordedCall as RecordedCall
from ._scripted import ScriptedClient as ScriptedClient
from ._scripted import split_text as split_text

__all__ = [
    "SCRIPTED_ANSWER",
    "Answer",
    "Crash",
    "Fail",
    "Hang",
    "RecordedCall",
    "ScriptedClient",
    "split_text",
]
