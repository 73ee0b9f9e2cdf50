"""SHA-256 from the interpreter's builtin module, for the light path.

``hashlib`` would load OpenSSL (~2 ms) for one digest; the builtin module is
``_sha2`` since Python 3.12 and ``_sha256`` before.  One place, so that the
next rename is mended once.
"""

from __future__ import annotations

import sys

try:
    if sys.version_info >= (3, 12):
        from _sha2 import sha256
    else:
        from _sha256 import sha256  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - interpreters without it
    from hashlib import sha256


def sha256_hex(data: bytes) -> str:
    """The hex SHA-256 digest of ``data``."""
    return str(sha256(data).hexdigest())
