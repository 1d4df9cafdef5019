"""The errors the engine raises to its callers (the servicer maps each to a gRPC code)."""

from __future__ import annotations

from server.requests import Failure


class EngineError(Exception):
    """The engine cannot load, start or finish a request (the message says why)."""


class Overloaded(EngineError):
    """Admission refused: too much work is waiting (RESOURCE_EXHAUSTED)."""


class EngineClosed(EngineError):
    """The engine is not running or is shutting down (UNAVAILABLE, unlike a failed step)."""


class NoContinuousCache(ValueError):
    """A call asked for the continuous cache of a model that has none (FAILED_PRECONDITION)."""


def failure_error(failure: Failure) -> EngineError:
    """The error a caller gets for a request that failed in the engine."""
    return (EngineClosed if failure.shutdown else EngineError)(failure.message)
