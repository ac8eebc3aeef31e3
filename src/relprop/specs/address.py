"""``--address``: is a Ray cluster there at all, checked in seconds before ``ray.init``.

``ray.init`` retries the connection to an address that nothing listens on for minutes (the GCS client's
own retries), so a typo or a cluster that is down looked like a hang. One TCP connect with a short timeout
to the address's host and port answers it first. Only reachability is checked: whether what answers is
a Ray cluster of a matching version is Ray's to say.
"""

from __future__ import annotations

import socket

from .errors import SpecError

#: seconds the probe waits for the TCP handshake (a cluster on another continent answers well within it)
PROBE_SECONDS = 5.0
#: the port of a ``ray://`` address without one (Ray Client's default)
CLIENT_PORT = 10001


def ray_host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` an ``--address`` connects to, or None where Ray finds the cluster itself
    (``auto``, ``local``) or the form has no port to check (a bare host name: left to Ray).
    ``HOST:PORT`` (the GCS), ``ray://HOST[:PORT]`` (Ray Client, port 10001 by default), IPv6 in brackets."""
    a = address.strip()
    if a.lower() in ("auto", "local", ""):
        return None
    default: int | None = None
    if a.lower().startswith("ray://"):
        a, default = a[len("ray://") :], CLIENT_PORT
    a = a.split("/", 1)[0]  # ray://host:port/... : the rest is not ours to read
    if a.startswith("["):  # [::1]:6379
        host, _, rest = a[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif a.count(":") == 1:
        host, port_text = a.split(":")
    else:  # a bare host (or a bare IPv6 address): no port of its own
        host, port_text = a, ""
    if not port_text:
        return None if default is None else (host, default)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SpecError(f"Ray address {address}: {port_text!r} is not a port; give HOST:PORT, ray://HOST:PORT or auto")
    return host, int(port_text)


def check_ray_address(address: str | None, timeout: float = PROBE_SECONDS) -> None:
    """Raise :class:`SpecError` (one line, naming ``address``) when nothing accepts a TCP connection at
    its host and port within ``timeout`` seconds; nothing for ``None``, ``auto``, ``local``."""
    target = ray_host_port(address) if address else None
    if target is None:
        return
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as ex:
        why = f"no answer within {timeout:g} s" if isinstance(ex, TimeoutError) else (ex.strerror or type(ex).__name__)
        raise SpecError(
            f"Ray address {address}: nothing answers at {host}:{port} ({why}); start a "
            f"cluster there (ray start --head) or leave out --address (and RAY_ADDRESS) for a local one"
        ) from None
