"""Which event loop and HTTP parser uvicorn serves the API with."""

from __future__ import annotations

import importlib.util

LOOPS = ("auto", "uvloop", "asyncio")
PARSERS = ("auto", "httptools", "h11")


def _installed(module: str, fallback: str) -> str:
    return module if importlib.util.find_spec(module) is not None else fallback


def choose(loop: str = "auto", http: str = "auto") -> tuple[str, str]:
    """(loop, http) with "auto" resolved: the C implementations when installed.

    uvloop and httptools serve more than twice the rows per core of asyncio
    and h11 (docs/benchmarks.md); the pure-Python pair is the fallback where
    they cannot be installed.
    """
    if loop not in LOOPS or http not in PARSERS:
        raise ValueError(f"unknown loop {loop!r} or HTTP parser {http!r}")
    return (
        _installed("uvloop", "asyncio") if loop == "auto" else loop,
        _installed("httptools", "h11") if http == "auto" else http,
    )
