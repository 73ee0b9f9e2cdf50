"""Socket addresses: the one parser from what containerd and people write to a socket path.

An *address* is what an ``address`` file, ``TTRPC_ADDRESS`` or a person names
a unix socket by; a *socket path* is what ``bind(2)``/``connect(2)`` take.

=================== ===================== ==========================================
address             socket path           note
=================== ===================== ==========================================
``unix:///run/x``   ``/run/x``            what ``start`` writes (containerd 1.6)
``/run/x``, ``./x`` ``/run/x``, ``./x``   a plain path (has a ``/``)
``@name``           ``\\0name``             abstract socket
``\\0name``           ``\\0name``             abstract, already in the kernel's form
``name``            ``\\0name``             abstract: older containerd address files
=================== ===================== ==========================================

:func:`address_of` goes the other way, from a bound socket's name, and writes
an abstract socket as ``@name`` (the one written form).  The ttrpc package
takes socket paths only: its callers parse addresses here.
"""

from __future__ import annotations

import os

UNIX = "unix://"
ABSTRACT = "@"


def socket_path(address: str) -> str:
    """The socket path ``address`` names (see the module's table); ValueError if empty."""
    if address.startswith(UNIX):
        path = address[len(UNIX):]
        if not path:
            raise ValueError(f"socket address {address!r} names no path")
        return path
    if not address:
        raise ValueError("empty socket address")
    if address.startswith(ABSTRACT):
        return "\0" + address[1:]
    if address.startswith("\0") or "/" in address:
        return address
    return "\0" + address


def is_abstract(path: str) -> bool:
    """Whether a socket path (not an address) names an abstract socket."""
    return path.startswith("\0")


def address_of(name: str | bytes) -> str:
    """The address of a socket bound to ``name`` (``getsockname()``): ``unix://...`` or ``@...``."""
    text = name.decode(errors="replace") if isinstance(name, bytes) else name
    if is_abstract(text):
        return ABSTRACT + text[1:]
    return UNIX + text


def canonical(address: str) -> str:
    """``address`` as people are shown it: ``unix://<absolute path>`` or ``@name``."""
    path = socket_path(address)
    if is_abstract(path):
        return address_of(path)
    return UNIX + os.path.abspath(path)

