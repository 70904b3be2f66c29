"""Domain errors of the library. The service maps each to one gRPC status
code in a single place (service/errors.py); the library never imports gRPC."""

from __future__ import annotations


class EvolveError(Exception):
    """Base of every error the library raises on purpose."""


class InvalidArgumentError(EvolveError):
    """Bad input; `field` names the offending field (e.g. 'spec.source.path')."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class NotFoundError(EvolveError):
    def __init__(self, kind: str, name: str):
        super().__init__(f"{kind} {name!r} not found")
        self.kind = kind
        self.name = name


class AlreadyExistsError(EvolveError):
    def __init__(self, kind: str, name: str):
        super().__init__(f"{kind} {name!r} already exists")
        self.kind = kind
        self.name = name


class ResourceExhaustedError(EvolveError):
    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class FailedPreconditionError(EvolveError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# What a read-only serving replica answers to any change, from the engine
# (FailedPreconditionError) and from the server's interceptor alike.
READ_ONLY_MESSAGE = ("this server is a read-only replica (--read-only) of a state directory another server writes: "
                     "send changes (SubmitTask, Improve, Cancel*, Delete*) to that server")


class CancelledError(EvolveError):
    """A search was cancelled between steps."""


class CorruptCheckpointError(EvolveError):
    """A checkpoint step failed its integrity check."""


class StorageError(EvolveError):
    """The state directory cannot be written: nothing was acknowledged.

    `disk_full` (no space, quota, file size limit) maps to RESOURCE_EXHAUSTED,
    any other storage failure to UNAVAILABLE; the message names the directory.
    """

    def __init__(self, state_dir: str, message: str, *, disk_full: bool = False):
        super().__init__(f"state directory {state_dir}: {message}")
        self.state_dir = state_dir
        self.disk_full = disk_full


class StateDirLockedError(EvolveError):
    """Another process holds the state directory."""

    def __init__(self, state_dir: str, holder: str):
        super().__init__(f"state directory {state_dir} is in use by {holder}; one server per state directory")
        self.state_dir = state_dir
        self.holder = holder
