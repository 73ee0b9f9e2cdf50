"""``SHIM -info``: describe the shim and its OCI runtime to containerd 2.x, as a ``RuntimeInfo``.

containerd 2.x runs ``SHIM -info`` (no action, no other flag) for ``ctr
plugins inspect-runtime`` and the introspection API, for a Create with
idmapped mounts (a failure fails the Create), and from 2.2 on before every
Create of a runtime that is not runc's.  It writes the runtime options on
stdin (a serialized ``Any``, maybe empty) and reads stdout as a
``containerd.types.RuntimeInfo`` (its ``api/types/introspection.proto``; our
copy is ``supervisor/api/types/introspection.proto``)::

    RuntimeInfo{name=1, version=2 (RuntimeVersion{version=1, revision=2}),
                options=3 (Any), features=4 (Any),
                annotations=5 (map<string, string>)}

What we print, as containerd's runc shim does (its ``manager.Info``):
:data:`RUNTIME_NAME`; our version; the options ``Any`` echoed as it came
(only when some came; options of a type the shim cannot decode are an error,
as there); the OCI runtime's ``features`` -- the stdout of ``<runtime>
features`` (the options' ``binary_name``, else ``runc``, looked up on PATH; a
runtime that is not found is an error), a JSON ``features.Features``, in an
``Any`` of type :data:`FEATURES_TYPE_URL` (containerd registers that type
URL for the JSON message), left out when the runtime cannot say (a runtime
without the command); and one annotation, :data:`RUNTIME_ANNOTATION`, the
runtime binary's path.  Errors go to stderr with exit status 1; containerd
reports that text.

Standard library only (:mod:`supervisor.launch`'s rule), encoded by hand with
:mod:`~supervisor.launch._pbwire` (``tests/unit/test_info.py`` checks the bytes
against the generated class); the options are decoded by the caller's
decoder, which imports protobuf only when options came.
"""

from __future__ import annotations

import sys

from supervisor.launch._pbwire import field_bytes
from supervisor.launch.defaults import DEFAULT_BINARY

TYPE_CHECKING = False  # not typing's: importing typing costs ~2 ms
if TYPE_CHECKING:
    from collections.abc import Callable

    from supervisor.launch.settings import Settings

#: The runtime's name, as containerd's config names it (``runtime_type``).
RUNTIME_NAME = "io.containerd.supervisor.v2"
#: containerd's type URL for runtime-spec's JSON ``features.Features``
#: (``typeurl.Register(&features.Features{}, "types.containerd.io",
#: "opencontainers/runtime-spec", "1", "features", "Features")``).
FEATURES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
#: The annotation naming the OCI runtime binary the features came from.
RUNTIME_ANNOTATION = "io.containerd.supervisor.v2.runtime"
#: How long ``<runtime> features`` may take.
FEATURES_TIMEOUT = 30.0


class InfoError(Exception):
    """``-info`` cannot describe the runtime (the message says why)."""


def encode_any(type_url: str, value: bytes) -> bytes:
    """``google.protobuf.Any{type_url=1, value=2}``."""
    return field_bytes(1, type_url.encode()) + field_bytes(2, value)


def encode_runtime_info(*, name: str, version: str, revision: str, options: bytes,
                        features: bytes | None, annotations: dict[str, str]) -> bytes:
    """A serialized ``RuntimeInfo``; ``options`` is a serialized ``Any`` (b"" for none),
    ``features`` the JSON the runtime printed (None for none)."""
    out = field_bytes(1, name.encode())
    out += field_bytes(2, field_bytes(1, version.encode()) + field_bytes(2, revision.encode()),
                       always=True)
    if options:
        out += field_bytes(3, options, always=True)
    if features is not None:
        out += field_bytes(4, encode_any(FEATURES_TYPE_URL, features), always=True)
    for key in sorted(annotations):
        entry = field_bytes(1, key.encode()) + field_bytes(2, annotations[key].encode())
        out += field_bytes(5, entry, always=True)
    return out


def runtime_features(binary: str) -> bytes | None:
    """``<binary> features``' JSON object, or None if the runtime cannot tell."""
    import json
    import subprocess

    try:
        done = subprocess.run([binary, "features"], capture_output=True, check=False,
                              timeout=FEATURES_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    try:
        value = json.loads(done.stdout)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    return json.dumps(value, separators=(",", ":")).encode()


def runtime_info(options: bytes, decode_options: Callable[[bytes], Settings], *,
                 version: str, revision: str) -> bytes:
    """The ``RuntimeInfo`` for ``options`` (a serialized ``Any``, maybe b"")."""
    import shutil

    name = DEFAULT_BINARY
    if options:
        try:
            settings = decode_options(options)
        except Exception as e:
            raise InfoError(f"failed to read runtime options: {e}") from None
        name = settings.binary_name or DEFAULT_BINARY
    binary = shutil.which(name)
    if binary is None:
        raise InfoError(f"failed to look up the path of {name!r}")
    return encode_runtime_info(name=RUNTIME_NAME, version=version, revision=revision,
                               options=options, features=runtime_features(binary),
                               annotations={RUNTIME_ANNOTATION: binary})


def action_info(decode_options: Callable[[bytes], Settings], *, version: str,
                revision: str) -> int:
    """Read the options on stdin, print the ``RuntimeInfo``; 0, or 1 with the reason on stderr."""
    options = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
    try:
        data = runtime_info(options, decode_options, version=version, revision=revision)
    except InfoError as e:
        sys.stderr.write(f"{RUNTIME_NAME} -info: {e}\n")
        return 1
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0
