"""Shared pytest options.

``--chaos`` runs the reliability suite (``tests/test_reliability_*.py``) at full size: thousands
of concurrent requests instead of hundreds, 100k requests for the memory check, and the
cancellation latency measured on the real clock. CI's default run stays small and fast.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hypothesis import settings
from trio.testing import wait_all_tasks_blocked

from relayrace.testing import MockProvider, serve_mock_provider

#: No per-example deadline: a deadline is a timing assertion, and these machines are shared and
#: noisy (an example of 0.35 s failed the 200 ms default under load). Speed is the benchmarks'.
settings.register_profile("relayrace", deadline=None)
settings.load_profile("relayrace")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos",
        action="store_true",
        default=False,
        help="run the reliability suite at full size (slow; not part of the default run)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "chaos: runs only with --chaos (too slow or too noisy for the default run)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--chaos"):
        return
    skip = pytest.mark.skip(reason="runs only with --chaos")
    for item in items:
        if "chaos" in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A test that takes `seed` runs on one seed by default (one whose draw mixes replies and
    # errors) and on five with --chaos.
    if "seed" in metafunc.fixturenames:
        seeds = [1, 2, 3, 4, 5] if metafunc.config.getoption("--chaos") else [2]
        metafunc.parametrize("seed", seeds)


@pytest.fixture
def chaos(request: pytest.FixtureRequest) -> bool:
    """Whether the suite runs at full size (``--chaos``)."""
    return bool(request.config.getoption("--chaos"))


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    """A mock provider on loopback for the test; afterwards nothing it served may have crashed
    it. (A test file with other needs defines its own ``mock``, which takes precedence.)"""
    async with serve_mock_provider() as provider:
        yield provider
        await wait_all_tasks_blocked()
        assert provider.errors == []
