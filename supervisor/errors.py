"""The shim's own error types, independent of any wire protocol.

Everything below the Task service raises these (or
:class:`supervisor.runtime.OCIRuntimeError`); the Task service alone maps them
to ttrpc status codes, which containerd turns back into its ``errdefs`` kinds.
"""

from __future__ import annotations


class ShimError(Exception):
    """Base class: a request the shim could not honour, and why."""


class NotFound(ShimError):
    """No such container, process or resource."""


class AlreadyExists(ShimError):
    """The id is taken."""


class FailedPrecondition(ShimError):
    """The operation is not allowed in the object's current state."""


class InvalidArgument(ShimError):
    """The request itself is wrong (bad bundle, bad options, bad spec)."""


class Unavailable(ShimError):
    """A resource the shim needs is not there right now."""


class ResourceExhausted(ShimError):
    """A limit is reached (say, the containers one shared shim may serve)."""


class Unimplemented(ShimError):
    """The shim does not do this."""
