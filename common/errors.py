"""The one error hierarchy of the mesh, and its one mapping to gRPC status codes.

Errors are named by cause. Servicers raise these; `common.grpc_server` turns them
into statuses in exactly one place (`to_grpc_status`), and clients turn an
`grpc.RpcError` back into the same class with `from_rpc_error`.
"""

from __future__ import annotations

import grpc


class GraftmeshError(Exception):
    """Base of every error the mesh raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgumentError(GraftmeshError):
    """The caller sent something malformed; `field` is the path of the bad field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, field: str = "") -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class NotFoundError(GraftmeshError):
    """The named thing does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(GraftmeshError):
    """The thing to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(GraftmeshError):
    """The request is valid, but the system is not in a state that allows it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(GraftmeshError):
    """A limit (size, budget, quota, queue) would be exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(GraftmeshError):
    """A dependency (another agent, NATS, Redis) cannot be reached right now."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(GraftmeshError):
    """The work did not finish within the caller's deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class IntegrityError(GraftmeshError):
    """Stored data failed its checksum or structure check; it is never loaded."""

    code = grpc.StatusCode.DATA_LOSS


class ConfigError(GraftmeshError):
    """`startup_config.yaml` is invalid; `problems` lists every problem found."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


_BY_CODE: dict[grpc.StatusCode, type[GraftmeshError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        IntegrityError,
    )
}

# Codes a client may retry on another attempt or another replica.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def to_grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details a servicer answers for `exc`.

    Anything that is not a `GraftmeshError` is a bug: INTERNAL, without leaking
    the exception text to the caller (it goes to the log and the error bus).
    """
    if isinstance(exc, GraftmeshError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"


def from_rpc_error(exc: grpc.RpcError) -> GraftmeshError:
    """The mesh error that a failed call stands for, on the client's side."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return _BY_CODE.get(code, GraftmeshError)(details or code.name)
