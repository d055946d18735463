"""The listening side of a StorageServer: sockets, TLS and who may connect.

:func:`listening_socket` binds TCP and unix sockets (with owner, group and
mode for a socket file, and Linux's abstract namespace for ``@name``),
:func:`systemd_socket` takes a socket handed over by systemd socket
activation, :func:`check_exposure` refuses to serve a network without
authentication or TLS, and :func:`server_tls_context` /
:func:`client_tls_context` build the standard library's ``ssl`` contexts.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import logging
import os
import pwd
import socket
import ssl
import stat

from dhruva.error import StorageError
from dhruva.net_protocol import Address, format_address, socket_address

log = logging.getLogger(__name__)

#: The first file descriptor systemd passes (``SD_LISTEN_FDS_START``).
SYSTEMD_FIRST_FD = 3


def listening_socket(
    address: Address,
    *,
    owner: str | int | None = None,
    group: str | int | None = None,
    mode: int | None = None,
    backlog: int = 128,
) -> socket.socket:
    """Return a bound, listening, non-blocking socket for ``address``.

    :param owner: user name or uid to give a unix socket file to.
    :param group: group name or gid to give a unix socket file to.
    :param mode: permission bits for a unix socket file (e.g. ``0o660``).
    :raises StorageError: when the address is in use, the path is not a socket,
        or the owner, group or mode cannot be set.
    """
    family, target = socket_address(address)
    path = target if isinstance(target, str) and not target.startswith("\0") else None
    if path is None and (owner is not None or group is not None or mode is not None):
        raise StorageError(
            f"--socket-owner, --socket-group and --socket-mode apply to a unix "
            f"socket file, not to {format_address(address)}"
        )
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if path is not None:
            _clear_stale_socket_file(path)
        elif family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(target)
        if path is not None:
            # Before listen(): nobody can connect until the file is as asked.
            _set_socket_file_access(path, owner, group, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StorageError(
            f"cannot listen on {format_address(address)}: {exc.strerror or exc}; "
            "is another server running there? Stop it (dhruva server --stop) or "
            "choose another --port or --address"
        ) from exc
    except BaseException:
        sock.close()
        raise
    return sock


def _set_socket_file_access(
    path: str, owner: str | int | None, group: str | int | None, mode: int | None
) -> None:
    uid = -1 if owner is None else _lookup(owner, pwd.getpwnam, "user", path)
    gid = -1 if group is None else _lookup(group, grp.getgrnam, "group", path)
    try:
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid)
        if mode is not None:
            os.chmod(path, mode)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise StorageError(
            f"cannot set the owner, group or mode of the socket {path}: "
            f"{exc.strerror or exc}; a server may give its socket only to a "
            "group it belongs to unless it runs as root"
        ) from exc


def _lookup(name: str | int, getter: object, what: str, path: str) -> int:
    if isinstance(name, int) or name.isdigit():
        return int(name)
    try:
        entry = getter(name)  # type: ignore[operator]
    except KeyError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise StorageError(
            f"no {what} named {name!r} for the socket {path}; give an existing "
            f"{what} name or a numeric id"
        ) from None
    return int(entry[2])


def parse_mode(text: str) -> int:
    """Return the permission bits an octal string such as ``"660"`` names.

    :raises StorageError: for anything but 1 to 4 octal digits.
    """
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise StorageError(
            f"socket mode {text!r} is not an octal permission such as 660"
        )
    return mode


def _clear_stale_socket_file(path: str) -> None:
    """Remove a socket file left by a server that is gone."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StorageError(
            f"{path} exists and is not a unix socket; remove it or choose "
            "another --address"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        log.info("removing stale socket file %s", path)
        os.unlink(path)
    else:
        raise StorageError(
            f"a server is already listening on {path}; stop it (dhruva server "
            "--stop) or choose another --address"
        )
    finally:
        probe.close()


def remove_socket_file(address: Address) -> None:
    if isinstance(address, str) and not address.startswith("@"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)


def bound_address(sock: socket.socket) -> Address:
    """Return the address ``sock`` listens on, as the client options write it."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if isinstance(name, bytes):
            name = name.decode("utf-8", "surrogateescape")
        return "@" + name[1:] if name.startswith("\0") else name
    return (str(name[0]), int(name[1]))


def systemd_socket(environ: dict[str, str] | None = None) -> socket.socket | None:
    """Return the listening socket systemd passed to this process, if any.

    Socket activation sets ``LISTEN_PID`` to our pid and ``LISTEN_FDS`` to the
    number of sockets passed from file descriptor 3 on; the server uses the
    first. Both variables are removed, so children do not take the socket.

    :raises StorageError: when the passed descriptor is not a listening
        stream socket.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()) or not env.get("LISTEN_FDS"):
        return None
    count = int(env["LISTEN_FDS"])
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if count < 1:
        return None
    if count > 1:
        log.warning("systemd passed %d sockets; serving only the first", count)
    try:
        sock = socket.socket(fileno=SYSTEMD_FIRST_FD)
    except OSError as exc:
        raise StorageError(
            f"LISTEN_FDS is set but file descriptor {SYSTEMD_FIRST_FD} is not a "
            f"socket ({exc.strerror or exc}); check the systemd .socket unit"
        ) from exc
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.detach()
        raise StorageError(
            "the socket systemd passed is not a listening stream socket; set "
            "ListenStream= in the .socket unit"
        )
    sock.setblocking(False)
    return sock


def is_local(address: Address) -> bool:
    """Return True for a unix socket or a loopback host."""
    if isinstance(address, str):
        return True
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(address: Address, secured: bool, insecure: bool) -> None:
    """Refuse to serve a network address with neither authentication nor TLS.

    :raises StorageError: naming the address and the options that fix it.
    """
    if secured or insecure or is_local(address):
        return
    raise StorageError(
        f"refusing to listen on {format_address(address)} without authentication "
        "or TLS: anyone who reaches that address could read and change the "
        "database. Give --auth-file (or DHRUVA_AUTH_KEY) and/or --tls-cert and "
        "--tls-key, listen on 127.0.0.1 or a unix socket, or pass --insecure"
    )


def server_tls_context(
    certfile: str, keyfile: str | None = None, cafile: str | None = None
) -> ssl.SSLContext:
    """Return a server TLS context; with ``cafile``, clients need a certificate.

    :raises StorageError: naming the file that cannot be loaded.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
        if cafile is not None:
            context.load_verify_locations(cafile)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        if keyfile is None and isinstance(exc, ssl.SSLError):
            raise StorageError(
                f"cannot load the TLS certificate {certfile}: {exc}; it holds "
                "no private key (or not the certificate's): give the key's "
                "PEM file with --tls-key (tls_key=)"
            ) from exc
        raise StorageError(
            f"cannot load the TLS certificate {certfile} (key {keyfile}, CA "
            f"{cafile}): {exc}; give PEM files"
        ) from exc
    return context


def client_tls_context(
    cafile: str | None, certfile: str | None = None, keyfile: str | None = None
) -> ssl.SSLContext:
    """Return a client TLS context trusting ``cafile`` (the system CAs if None).

    :raises StorageError: naming the file that cannot be loaded.
    """
    try:
        context = ssl.create_default_context(cafile=cafile)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if certfile is not None:
            context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise StorageError(
            f"cannot load the TLS files (CA {cafile}, certificate {certfile}, "
            f"key {keyfile}): {exc}; give PEM files"
        ) from exc
    return context
