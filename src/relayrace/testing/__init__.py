"""Test helpers: a scripted provider client and a fault-injecting mock provider server."""

from ._mock_embeddings import MOCK_DIMENSIONS as MOCK_DIMENSIONS
from ._mock_embeddings import mock_vector as mock_vector
from ._mock_provider import MockAttempt as MockAttempt
from ._mock_provider import MockProvider as MockProvider
from ._mock_provider import serve_mock_provider as serve_mock_provider
from ._scenarios import SCENARIOS as MOCK_SCENARIOS
from ._scenarios import MockScenario as MockScenario
from ._scenarios import mock_model as mock_model
from ._scripted import SCRIPTED_ANSWER as SCRIPTED_ANSWER
from ._scripted import Answer as Answer
from ._scripted import Crash as Crash
from ._scripted import Fail as Fail
from ._scripted import Hang as Hang
from ._scripted import RecordedCall as RecordedCall
from ._scripted import ScriptedClient as ScriptedClient
from ._scripted import split_text as split_text

__all__ = [
    "MOCK_DIMENSIONS",
    "MOCK_SCENARIOS",
    "SCRIPTED_ANSWER",
    "Answer",
    "Crash",
    "Fail",
    "Hang",
    "MockAttempt",
    "MockProvider",
    "MockScenario",
    "RecordedCall",
    "ScriptedClient",
    "mock_model",
    "mock_vector",
    "serve_mock_provider",
    "split_text",
]
