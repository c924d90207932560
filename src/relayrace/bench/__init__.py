"""``relayrace bench``: load benchmarks against the mock provider, side by side with bare httpx
and LiteLLM's Router. ``main(argv)`` is the command; see ``benchmarks/README.md``."""

from ._main import main as main

__all__ = ["main"]
