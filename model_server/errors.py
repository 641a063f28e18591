"""Errors of the model server; each maps to one gRPC status code in ``service.py``."""

from __future__ import annotations


class ModelServerError(Exception):
    """Base class; ``code`` is the name of the gRPC status code it maps to."""

    code = "INTERNAL"


class InvalidArgument(ModelServerError):
    """A request field is unusable. The message starts with the field path."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class ModelNotFound(ModelServerError):
    code = "NOT_FOUND"


class Overloaded(ModelServerError):
    """The model's queue is full or a request waited too long for a slot."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(ModelServerError):
    """Draining, or the model is loading / unloading / unhealthy: retry elsewhere."""

    code = "UNAVAILABLE"


class AlreadyExists(ModelServerError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ModelServerError):
    code = "FAILED_PRECONDITION"


class EngineError(ModelServerError):
    """The engine failed while serving a request (maps to INTERNAL)."""

    code = "INTERNAL"
