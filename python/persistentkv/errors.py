"""Typed errors of the PersistentKV worker.

Every failed call raises a subclass of `WorkerError` that carries the gRPC status code and the
worker's message. The worker's messages begin with the request field they are about ("q.shape is
[2, 8, 32], want [2, 8, 64]", "rows[1]: sequence 7 listed twice"); `WorkerError.field` is that
leading field ("q.shape", "rows[1]"), or "" when the message names none.
"""

from __future__ import annotations

import re

import grpc

__all__ = [
    "WorkerError",
    "Cancelled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "WorkerRestarted",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "WorkerDraining",
    "DataLoss",
    "Unauthenticated",
    "error_from_code",
    "error_from_rpc",
]

# A field path at the start of a message: `q.shape`, `rows[1]`, `chunk.k.shape`, `sequence_id`
# (fields are snake_case: "KV pool full: ..." names none).
_FIELD = re.compile(r"^([a-z_][a-z0-9_]*(?:\[\d+\])?(?:\.[a-z_][a-z0-9_]*(?:\[\d+\])?)*)[:. ]")


class WorkerError(Exception):
    """A call to the worker failed. `code` is the grpc.StatusCode, `message` the worker's text."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None, method: str = "") -> None:
        if code is not None:
            self.code = code
        self.message = message
        self.method = method
        match = _FIELD.match(message)
        self.field = match.group(1) if match else ""
        prefix = f"{method}: " if method else ""
        super().__init__(f"{prefix}{self.code.name}: {message}")


class Cancelled(WorkerError):
    code = grpc.StatusCode.CANCELLED


class Unknown(WorkerError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(WorkerError):
    """A malformed request: shape, dtype, byte size, layer, duplicate row, ..."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(WorkerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(WorkerError):
    """An unknown sequence id."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(WorkerError):
    """Opening or writing a sequence id that is in use."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(WorkerError):
    """The sequence or token step belongs to another router."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(WorkerError):
    """KV pool, work queue, open token steps or sequences full (the message says which)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(WorkerError):
    """The request does not fit the worker's state (layer order, prompt still being written, ...)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class WorkerRestarted(FailedPrecondition):
    """The worker is another incarnation than the one this client pinned: its sequences are gone."""


class Aborted(WorkerError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(WorkerError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(WorkerError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(WorkerError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(WorkerError):
    """The worker cannot be reached, or the stream was cut."""

    code = grpc.StatusCode.UNAVAILABLE


class WorkerDraining(Unavailable):
    """The worker is shutting down and takes no new token steps or prompts."""


class DataLoss(WorkerError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(WorkerError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[WorkerError]] = {
    cls.code: cls
    for cls in (Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
                PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
                Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated)
}
_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def error_from_code(code: grpc.StatusCode | int, message: str, method: str = "") -> WorkerError:
    """The typed error for a status code (a grpc.StatusCode or its number) and message."""
    if isinstance(code, int):
        code = _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    if code == grpc.StatusCode.FAILED_PRECONDITION and message.startswith("expected_incarnation:"):
        return WorkerRestarted(message, code, method)
    if code == grpc.StatusCode.UNAVAILABLE and "draining" in message:
        return WorkerDraining(message, code, method)
    return _BY_CODE.get(code, Unknown)(message, code, method)


def error_from_rpc(error: grpc.RpcError, method: str = "") -> WorkerError:
    """The typed error for a failed gRPC call."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return error_from_code(code or grpc.StatusCode.UNKNOWN, details or "", method)
