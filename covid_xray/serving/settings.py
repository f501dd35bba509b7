"""The server's limits and their validation: the one place for ``serve``'s options and defaults.

Both front ends use it: ``covid-xray serve`` (argparse ``type=`` functions) and ``create_app``
(the ``COVID_XRAY_*`` environment variables of ``flask run`` and the ``config`` mapping). Every
bad value is a :class:`SettingError` whose one-line message names the value and the valid range.
Cheap to import (no TensorFlow), so ``covid-xray --help`` stays fast.

Waitress settings and why (see docs/serving.md, "Limits"):

- ``connection_limit``: waitress stops accepting connections beyond it, so the default is far
  above what one machine's workers can serve, and idle connections are closed after
  ``channel_timeout`` seconds (checked every ``CLEANUP_INTERVAL_S``): connections that open and
  then stall (slow or malicious clients) cannot lock everybody else out for long.
- ``max_request_body_size``: waitress reads the whole body (to a temporary file beyond
  ``inbuf_overflow``) before the app sees the request. The cap is ``BODY_CAP_FACTOR`` times the
  upload limit, so the app answers the usual too-large uploads with its JSON 413 while the worst
  case stays bounded (about ``connection_limit`` x the cap of temporary disk).
- ``max_request_header_size``: browsers and curl send a few KB; waitress answers larger headers
  with its own plain-text 431 (the app never sees them).
- ``asyncore_use_poll``: ``select()`` cannot watch more than 1024 file descriptors.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import socket
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD_MB = 10.0
MAX_UPLOAD_MB_LIMIT = 1024.0
DEFAULT_THREADS = 4
MAX_THREADS = 256
DEFAULT_CONNECTION_LIMIT = 250
MIN_CONNECTION_LIMIT = 10
"""Waitress counts its own listening socket(s) and wake-up pipe among the connections."""
MAX_CONNECTION_LIMIT = 100_000
DEFAULT_CHANNEL_TIMEOUT_S = 30
MAX_CHANNEL_TIMEOUT_S = 3600
CLEANUP_INTERVAL_S = 1
MAX_HEADER_BYTES = 64 * 1024
BODY_CAP_FACTOR = 4
BODY_CAP_MARGIN_BYTES = 1024 * 1024
"""Room for the multipart envelope around an upload of exactly the limit."""
MAX_FORM_FIELD_BYTES = 500_000
"""Werkzeug's limit for one non-file multipart field (``MAX_FORM_MEMORY_SIZE``)."""
MAX_FORM_PARTS = 16
"""Werkzeug's limit on multipart parts (``MAX_FORM_PARTS``); the API needs one."""
MIN_MAX_PIXELS = 256 * 256
MAX_MAX_PIXELS = 1_000_000_000
MIB = 1024 * 1024
MIN_MAX_DECODED_MB = 1.0
"""A 1,000 x 1,000 grey image decodes to about 1 MiB: below this no usable X-ray would decode."""
MAX_MAX_DECODED_MB = 16384.0
DEFAULT_DECODE_SLOTS = 2
"""Large decodes (above ``predict.LARGE_DECODE_BYTES``) that may run at once; the others wait."""
MAX_DECODE_SLOTS = 64
"""Each slot may hold a decode of up to the cap plus its RGB copy at once."""
FDS_PER_CONNECTION = 3
"""Waitress: a socket, plus a temporary file each for a large request and a large response."""
FDS_RESERVED = 256
"""TensorFlow's libraries and thread pools, the model files, logging."""


class SettingError(ValueError):
    """A server setting is unusable; the message is one line naming it and the valid range."""


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise SettingError(f"{name} must be a finite number, got {value!r}")
    return number


def bounded_float(value: Any, name: str, high: float) -> float:
    """A finite number above 0 and at most ``high``."""
    number = _number(value, name)
    if not 0 < number <= high:
        raise SettingError(f"{name} must be above 0 and at most {high:g}, got {value!r}")
    return number


def bounded_int(value: Any, name: str, low: int, high: int) -> int:
    """A whole number from ``low`` to ``high``."""
    number = _number(value, name)
    if number != int(number):
        raise SettingError(f"{name} must be a whole number, got {value!r}")
    if not low <= number <= high:
        raise SettingError(f"{name} must be from {low:,} to {high:,}, got {value!r}")
    return int(number)


def max_upload_mb(value: Any, name: str = "--max-upload-mb") -> float:
    return bounded_float(value, name, MAX_UPLOAD_MB_LIMIT)


def max_pixels(value: Any, name: str = "--max-pixels") -> int:
    return bounded_int(value, name, MIN_MAX_PIXELS, MAX_MAX_PIXELS)


def max_decoded_mb(value: Any, name: str = "--max-decoded-mb") -> float:
    """The decoder-output cap in MiB (width x height x channels x bytes per channel)."""
    number = _number(value, name)
    if not MIN_MAX_DECODED_MB <= number <= MAX_MAX_DECODED_MB:
        raise SettingError(f"{name} must be from {MIN_MAX_DECODED_MB:g} to "
                           f"{MAX_MAX_DECODED_MB:g}, got {value!r}")
    return number


def decoded_bytes_cap(megabytes: float) -> int:
    """``--max-decoded-mb`` as the byte count ``PredictionService(max_bytes=...)`` takes."""
    return int(megabytes * MIB)


def decode_slots(value: Any, name: str = "--decode-slots") -> int:
    return bounded_int(value, name, 1, MAX_DECODE_SLOTS)


def ood_tolerance(value: Any, name: str = "--ood-tolerance") -> float:
    """Any finite positive factor: a large one effectively turns the feature check off."""
    number = _number(value, name)
    if number <= 0:
        raise SettingError(f"{name} must be above 0, got {value!r}")
    return number


def port(value: Any, name: str = "--port") -> int:
    return bounded_int(value, name, 1, 65535)


def threads(value: Any, name: str = "--threads") -> int:
    return bounded_int(value, name, 1, MAX_THREADS)


def connection_limit(value: Any, name: str = "--connection-limit") -> int:
    return bounded_int(value, name, MIN_CONNECTION_LIMIT, MAX_CONNECTION_LIMIT)


def channel_timeout(value: Any, name: str = "--channel-timeout") -> int:
    return bounded_int(value, name, 1, MAX_CHANNEL_TIMEOUT_S)


def host(value: str, name: str = "--host") -> str:
    """An IP address, or a name this machine resolves (no DNS wait for malformed addresses)."""
    text = value.strip().strip("[]")
    if not text:
        raise SettingError(f"{name} must not be empty")
    looks_numeric = all(c.isdigit() or c == "." for c in text) or ":" in text
    if looks_numeric:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise SettingError(f"{name} {value!r} is not a valid IP address") from None
        return text
    try:
        socket.getaddrinfo(text, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise SettingError(f"{name} {value!r} cannot be resolved to an address ({exc})") from None
    return text


def body_cap_bytes(upload_mb: float) -> int:
    """Waitress's ``max_request_body_size``: the app answers (JSON 413) every body below it."""
    return int(upload_mb * 1024 * 1024) * BODY_CAP_FACTOR + BODY_CAP_MARGIN_BYTES


def waitress_settings(host_name: str, port_number: int, upload_mb: float, thread_count: int,
                      connections: int, timeout_s: int) -> dict[str, Any]:
    """Keyword arguments for ``waitress.create_server`` (see the module docstring for why)."""
    return {"host": host_name, "port": port_number, "threads": thread_count,
            "connection_limit": connections, "channel_timeout": timeout_s,
            "cleanup_interval": CLEANUP_INTERVAL_S, "max_request_header_size": MAX_HEADER_BYTES,
            "max_request_body_size": body_cap_bytes(upload_mb), "asyncore_use_poll": True,
            "ident": "covid-xray"}


_LISTEN_HINTS = {
    errno.EADDRINUSE: " (another program listens there); choose another --port",
    errno.EADDRNOTAVAIL: " (not an address of this machine); use 127.0.0.1, or 0.0.0.0 for all",
    errno.EACCES: " (ports below 1024 need privileges); choose --port 1024 or above",
}


def check_listen(host_name: str, port_number: int) -> None:
    """Bind (and release) every address waitress will bind, so a busy port fails in a second."""
    try:
        addresses = socket.getaddrinfo(host_name, port_number, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SettingError(f"cannot listen on {host_name}:{port_number}: {exc}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as waitress does
            try:
                probe.bind(address)
                probe.listen(1)
            except OSError as exc:
                raise SettingError(f"cannot listen on {host_name}:{port_number}: "
                                   f"{exc.strerror or exc}{_LISTEN_HINTS.get(exc.errno, '')}"
                                   ) from None


def ensure_open_files(connections: int) -> None:
    """Raise this process's open-file limit to what ``connections`` may need, or say why not."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows has no RLIMIT_NOFILE
        return
    needed = connections * FDS_PER_CONNECTION + FDS_RESERVED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SettingError(f"--connection-limit {connections} needs about {needed:,} open files "
                           f"but this process may open at most {hard:,} (ulimit -Hn); lower "
                           "--connection-limit or raise the limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
