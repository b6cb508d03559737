"""Every error infermon raises on purpose, in one place.

::

    InfermonError
    ├── ConfigError            bad configuration: the message names the key, the value and the fix
    ├── ListenError            a valid address that cannot be bound (port in use, no permission)
    └── ExchangeError          a request could not be proxied; the proxy answers ``status``
        ├── PoolExhausted          no upstream connection free within pool_timeout -> 503, kind=pool_exhausted
        ├── ProxyInternalError     a bug of the proxy's own while handling the exchange -> 500, kind=internal
        └── UpstreamError          the model server could not give an answer (mapped to 502 / 504)
            ├── UpstreamConnectError   refused, unreachable, DNS failure           -> 502, kind=connect
            ├── UpstreamTimeout        connect, response head or body idle timeout -> 504, kind=timeout
            ├── UpstreamReset          connection closed or reset mid-exchange     -> 502, kind=reset
            └── UpstreamProtocolError  the upstream's bytes are not HTTP/1.1       -> 502, kind=protocol

Client-side problems (malformed request, limits, slow clients) are not exceptions: the data plane
answers them directly with a JSON error response (``proxy.dataplane.heads.Rejection``).
"""

from __future__ import annotations

import os
import socket


class InfermonError(Exception):
    """Base class of the errors infermon raises on purpose."""


class ConfigError(InfermonError):
    """The configuration is invalid. ``str(exc)`` is ready to show to the user."""


class ListenError(InfermonError):
    """A configured address could not be bound. ``str(exc)`` is one line ready to show to the user::

        cannot listen on 127.0.0.1:8080: Address already in use (change listen or --listen)

    Every command exits 1 on it (a configuration error is 2: the address itself is valid).
    """

    def __init__(self, address: str, error: OSError, fix: str) -> None:
        self.address = address
        self.error = error
        super().__init__(f"cannot listen on {address}: {_reason(error)} ({fix})")


def _reason(error: OSError) -> str:
    # the loops' messages repeat the address ("error while attempting to bind on address ..."): keep the cause
    if isinstance(error, socket.gaierror) or not error.errno or error.errno < 0:
        return error.strerror or str(error)
    return os.strerror(error.errno)


class ExchangeError(InfermonError):
    """A request could not be proxied. ``kind`` goes to ``Exchange.error``, ``status`` to the client."""

    kind = "internal"
    status = 502


class PoolExhausted(ExchangeError):
    """No upstream connection became free within ``pool_timeout``."""

    kind = "pool_exhausted"
    status = 503


class ProxyInternalError(ExchangeError):
    """The proxy's own code failed while handling an exchange (logged with its traceback)."""

    kind = "internal"
    status = 500


class UpstreamError(ExchangeError):
    """The upstream (model server) exchange failed before a complete answer."""

    kind = "protocol"
    status = 502


class UpstreamConnectError(UpstreamError):
    kind = "connect"
    status = 502


class UpstreamTimeout(UpstreamError):
    kind = "timeout"
    status = 504


class UpstreamReset(UpstreamError):
    kind = "reset"
    status = 502


class UpstreamProtocolError(UpstreamError):
    kind = "protocol"
    status = 502
