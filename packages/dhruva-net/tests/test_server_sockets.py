"""Issue #5 security and sockets: authentication, TLS, --insecure, unix socket
access, the abstract namespace and systemd socket activation, on real servers."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
import uuid

import pytest
from dhruva.client_storage import ClientStorage, stop_server
from dhruva.error import ProtocolError, StorageError
from dhruva.net_protocol import (
    CMD_AUTH,
    CMD_QUIT,
    NONCE_SIZE,
    STATUS_CHALLENGE,
    STATUS_ERROR,
    STATUS_OKAY,
    AuthenticationError,
    auth_proof,
    frame,
    hello,
    unpack_error,
)
from dhruva.record import ROOT_OID, unpack_record
from dhruva.storage_testing import commit, make_record

KEY = secrets.token_hex(32).encode()


def serves(address, **options):
    client = ClientStorage(address=address, **options)
    try:
        commit(client, make_record(ROOT_OID, b"served"))
        return unpack_record(client.load(ROOT_OID))[1] == b"served"
    finally:
        client.close()


# --- authentication -------------------------------------------------------------


@pytest.fixture
def auth_server(run_server, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    return run_server(
        "--storage", "memory", "--port", "0", "--auth-file", str(key_file)
    )


def test_a_client_with_the_key_is_served(auth_server):
    assert serves(auth_server.address, auth_key=KEY)


def test_the_key_may_come_from_the_environment(auth_server, monkeypatch):
    monkeypatch.setenv("DHRUVA_AUTH_KEY", KEY.decode())
    assert serves(auth_server.address)


@pytest.mark.parametrize("key", [None, secrets.token_hex(32)], ids=["none", "wrong"])
def test_a_client_without_the_key_is_refused(auth_server, key, monkeypatch):
    monkeypatch.delenv("DHRUVA_AUTH_KEY", raising=False)
    with pytest.raises(AuthenticationError) as info:
        ClientStorage(address=auth_server.address, auth_key=key)
    assert "auth" in str(info.value)
    assert serves(auth_server.address, auth_key=KEY)


def test_a_replayed_answer_is_refused(wire, auth_server):
    def challenge(sock):
        sock.sendall(frame(hello()))
        assert wire.read_frame(sock)[:1] == b"H"
        reply = wire.read_frame(sock)
        assert reply[:1] == STATUS_CHALLENGE and len(reply) == 1 + NONCE_SIZE
        return reply[1:]

    # A good exchange, recorded by an eavesdropper.
    with wire.connect(auth_server.address) as sock:
        server_nonce = challenge(sock)
        nonce = secrets.token_bytes(NONCE_SIZE)
        answer = CMD_AUTH + nonce + auth_proof(KEY, b"client", server_nonce, nonce)
        sock.sendall(frame(answer))
        assert wire.read_frame(sock)[:1] == STATUS_OKAY

    # The same answer on a new connection meets a fresh challenge.
    with wire.connect(auth_server.address) as sock:
        assert challenge(sock) != server_nonce
        sock.sendall(frame(answer))
        reply = wire.read_frame(sock)
        assert reply[:1] == STATUS_ERROR
        assert isinstance(unpack_error(reply[1:]), AuthenticationError)
        assert wire.read_frame(sock) is None
    assert "failed authentication" in auth_server.log()


def test_failed_logins_are_one_warning_line_each(wire, auth_server, monkeypatch):
    monkeypatch.delenv("DHRUVA_AUTH_KEY", raising=False)
    with pytest.raises(AuthenticationError):
        ClientStorage(address=auth_server.address, auth_key=b"y" * 32)
    with wire.connect(auth_server.address) as sock:
        sock.sendall(frame(hello()))
        assert wire.read_frame(sock)[:1] == b"H"
        assert wire.read_frame(sock)[:1] == STATUS_CHALLENGE
        sock.sendall(frame(CMD_QUIT))  # a command before logging in
        assert wire.read_frame(sock)[:1] == STATUS_ERROR
    assert serves(auth_server.address, auth_key=KEY)  # and it serves on

    log = auth_server.log()
    lines = log.splitlines()
    wrong_key = [line for line in lines if "failed authentication" in line]
    no_login = [line for line in lines if "did not authenticate" in line]
    assert len(wrong_key) == 1 and "WARNING" in wrong_key[0], log
    assert len(no_login) == 1 and "WARNING" in no_login[0], log
    assert "Traceback" not in log and "internal error" not in log


def test_admin_commands_need_authentication(wire, auth_server):
    with wire.connect(auth_server.address) as sock:
        sock.sendall(frame(hello()))
        assert wire.read_frame(sock)[:1] == b"H"
        assert wire.read_frame(sock)[:1] == STATUS_CHALLENGE
        sock.sendall(frame(CMD_QUIT))  # stop, without authenticating
        reply = wire.read_frame(sock)
        assert isinstance(unpack_error(reply[1:]), AuthenticationError)
    with pytest.raises(AuthenticationError):
        stop_server(auth_server.address)
    with pytest.raises(AuthenticationError):
        ClientStorage(address=auth_server.address, auth_key=b"x" * 32).pack()
    assert auth_server.process.poll() is None

    stop_server(auth_server.address, auth_key=KEY)
    assert auth_server.process.wait(20) == 0


def test_a_client_with_a_key_refuses_a_server_without_one(memory_server):
    with pytest.raises(AuthenticationError, match="does not ask for auth"):
        ClientStorage(address=memory_server.address, auth_key=KEY)


def test_the_cli_stops_a_server_with_the_key_file(auth_server, tmp_path):
    host, port = auth_server.address
    command = [sys.executable, "-m", "dhruva.cli", "server", "--stop"]
    command += ["--port", str(port)]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "requires authentication" in refused.stderr
    done = subprocess.run(
        [*command, "--auth-file", str(tmp_path / "key")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert auth_server.process.wait(20) == 0


# --- TLS ------------------------------------------------------------------------


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    where = tmp_path_factory.mktemp("tls")
    days = ["-days", "2"]
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
            "-out", "ca.pem", "-subj", "/CN=dhruva test CA", *days,
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=where)  # fmt: skip
    for name, ext in [
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ]:
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=where)  # fmt: skip
        (where / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey",
                "ca.key", "-CAcreateserial", "-out", f"{name}.pem", *days,
                "-extfile", f"{name}.ext", cwd=where)  # fmt: skip
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
            "other.key", "-out", "other.pem", "-subj", "/CN=other CA", *days,
            cwd=where)  # fmt: skip
    return where


@pytest.fixture
def tls_server(run_server, certificates):
    c = certificates
    return run_server(
        "--storage", "memory", "--port", "0",
        "--tls-cert", str(c / "server.pem"), "--tls-key", str(c / "server.key"),
    )  # fmt: skip


def test_tls_serves_a_client_that_trusts_the_ca(tls_server, certificates):
    assert serves(tls_server.address, tls_ca=str(certificates / "ca.pem"))


def test_tls_is_refused_by_a_client_trusting_another_ca(tls_server, certificates):
    with pytest.raises(StorageError, match="TLS handshake"):
        ClientStorage(
            address=tls_server.address, tls_ca=str(certificates / "other.pem")
        )


def test_a_plain_client_of_a_tls_server_gets_an_error_not_a_hang(tls_server):
    with pytest.raises(ProtocolError, match="it may require TLS") as info:
        ClientStorage(address=tls_server.address, timeout=10)
    assert "--tls-ca" in str(info.value)
    assert "restart" not in str(info.value) and "abort" not in str(info.value)

    # The server logs one WARNING line (it may write it just after hanging up).
    deadline = time.monotonic() + 10
    while "TLS handshake with" not in tls_server.log():
        assert time.monotonic() < deadline, tls_server.log()
        time.sleep(0.05)
    failed = [line for line in tls_server.log().splitlines() if "TLS hand" in line]
    assert len(failed) == 1 and "WARNING" in failed[0], tls_server.log()
    assert "Traceback" not in tls_server.log()


def test_a_stalled_tls_handshake_does_not_block_others(wire, tls_server, certificates):
    with wire.connect(tls_server.address) as stalled:
        stalled.sendall(b"\x16\x03\x01")  # the start of a ClientHello, no more
        started = time.monotonic()
        assert serves(tls_server.address, tls_ca=str(certificates / "ca.pem"))
        assert time.monotonic() - started < 5


def test_tls_with_client_certificates(run_server, certificates):
    c = certificates
    server = run_server(
        "--storage", "memory", "--port", "0",
        "--tls-cert", str(c / "server.pem"), "--tls-key", str(c / "server.key"),
        "--tls-ca", str(c / "ca.pem"),
    )  # fmt: skip
    assert serves(
        server.address,
        tls_ca=str(c / "ca.pem"),
        tls_cert=str(c / "client.pem"),
        tls_key=str(c / "client.key"),
    )
    with pytest.raises(ProtocolError, match="requires a client certificate"):
        # No client certificate: the server ends the handshake.
        client = ClientStorage(address=server.address, tls_ca=str(c / "ca.pem"))
        client.load(ROOT_OID)


def test_a_certificate_without_its_key_names_tls_key(certificates, start_failing):
    message = start_failing(
        "--storage", "memory", "--port", "0",
        "--tls-cert", str(certificates / "server.pem"),
    )  # fmt: skip
    assert "--tls-key" in message


def test_an_address_in_use_leaves_no_database_file(
    memory_server, tmp_path, start_failing
):
    path = tmp_path / "new.durus"
    message = start_failing(
        "--file", str(path), "--port", str(memory_server.address[1])
    )
    assert str(memory_server.address[1]) in message
    assert not path.exists()
    assert list(tmp_path.glob("new.durus*")) == []


def test_server_stop_prints_no_info_line(run_server):
    server = run_server("--storage", "memory", "--port", "0")
    done = subprocess.run(
        [sys.executable, "-m", "dhruva.cli", "server", "--stop"]
        + ["--port", str(server.address[1])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "connected to" not in done.stderr + done.stdout
    assert server.process.wait(20) == 0


def test_tls_and_auth_together(run_server, certificates, tmp_path):
    (tmp_path / "key").write_bytes(KEY)
    c = certificates
    server = run_server(
        "--storage", "memory", "--port", "0", "--auth-file", str(tmp_path / "key"),
        "--tls-cert", str(c / "server.pem"), "--tls-key", str(c / "server.key"),
    )  # fmt: skip
    assert serves(server.address, tls_ca=str(c / "ca.pem"), auth_key=KEY)


# --- where the server listens ---------------------------------------------------


def test_a_network_address_without_auth_or_tls_is_refused(
    run_server, tmp_path, start_failing
):
    message = start_failing("--storage", "memory", "--host", "0.0.0.0", "--port", "0")
    assert "refusing to listen on 0.0.0.0" in message
    assert "--insecure" in message

    server = run_server(
        "--storage", "memory", "--host", "0.0.0.0", "--port", "0", "--insecure"
    )
    assert serves(("127.0.0.1", server.address[1]))
    warned = [line for line in server.log().splitlines() if "--insecure" in line]
    assert len(warned) == 1 and "WARNING" in warned[0], server.log()
    assert "neither authentication nor TLS" in warned[0]
    (tmp_path / "key").write_bytes(KEY)
    server = run_server(
        "--storage", "memory", "--host", "0.0.0.0", "--port", "0",
        "--auth-file", str(tmp_path / "key"),
    )  # fmt: skip
    assert serves(("127.0.0.1", server.address[1]), auth_key=KEY)


def test_unix_socket_owner_group_and_mode(run_server, socket_path):
    group = __import__("grp").getgrgid(os.getgid()).gr_name
    run_server(
        "--storage", "memory", "--address", socket_path,
        "--socket-mode", "600", "--socket-group", group,
    )  # fmt: skip
    info = os.stat(socket_path)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_gid == os.getgid()
    assert serves(socket_path)


def test_an_unknown_socket_owner_is_named(socket_path, start_failing):
    message = start_failing(
        "--storage", "memory", "--address", socket_path,
        "--socket-owner", "no-such-user-dhruva",
    )  # fmt: skip
    assert "no user named 'no-such-user-dhruva'" in message
    assert not os.path.exists(socket_path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_the_abstract_namespace(run_server):
    name = f"@dhruva-test-{uuid.uuid4().hex}"
    server = run_server("--storage", "memory", "--address", name)
    assert server.address == name
    assert serves(name)


SYSTEMD_WRAPPER = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def test_systemd_socket_activation(run_server, socket_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(16)
    try:
        fd = listener.fileno()
        server = run_server(
            "--storage",
            "memory",
            prefix=(sys.executable, "-c", SYSTEMD_WRAPPER, str(fd)),
            pass_fds=(fd,),
        )
        assert server.address == socket_path
        assert serves(socket_path)
    finally:
        listener.close()


def test_a_refused_systemd_socket_is_named(start_failing):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", 0))
    listener.listen(16)
    try:
        fd = listener.fileno()
        done = subprocess.run(
            [sys.executable, "-c", SYSTEMD_WRAPPER, str(fd)]
            + [sys.executable, "-m", "dhruva.cli", "server", "--storage", "memory"],
            capture_output=True,
            text=True,
            timeout=60,
            pass_fds=(fd,),
        )
        assert done.returncode != 0
        assert "socket passed by systemd" in done.stderr
        assert "2972" not in done.stderr  # the unused --port
    finally:
        listener.close()


def test_client_commands_take_the_key_and_ca_as_options(
    run_server, certificates, tmp_path
):
    (tmp_path / "key").write_bytes(KEY)
    c = certificates
    server = run_server(
        "--storage", "memory", "--port", "0", "--auth-file", str(tmp_path / "key"),
        "--tls-cert", str(c / "server.pem"), "--tls-key", str(c / "server.key"),
    )  # fmt: skip
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("DHRUVA_AUTH", "DHRUVA_TLS"))
    }
    command = [sys.executable, "-m", "dhruva.cli", "-c", "--port"]
    command += [str(server.address[1]), "--auth-file", str(tmp_path / "key")]
    command += ["--tls-ca", str(c / "ca.pem")]
    done = subprocess.run(
        command,
        input='root["via"] = "options"\nconnection.commit()\nprint(root["via"])\n',
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "options\n"


def test_client_commands_take_the_key_and_ca_from_the_environment(
    run_server, certificates, tmp_path
):
    (tmp_path / "key").write_bytes(KEY)
    c = certificates
    server = run_server(
        "--storage", "memory", "--port", "0", "--auth-file", str(tmp_path / "key"),
        "--tls-cert", str(c / "server.pem"), "--tls-key", str(c / "server.key"),
    )  # fmt: skip
    command = [sys.executable, "-m", "dhruva.cli", "pack", "--port"]
    command.append(str(server.address[1]))
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    env = {
        **os.environ,
        "DHRUVA_AUTH_FILE": str(tmp_path / "key"),
        "DHRUVA_TLS_CA": str(c / "ca.pem"),
    }
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert "packed" in done.stdout
