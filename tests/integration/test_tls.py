"""TLS on both sides of the gateway, and secrets that must never be shown.

The certificates are made here, for each run, with the `openssl` command-line tool (no Python
dependency): a CA, a server certificate for 127.0.0.1 and localhost signed by it, and one for a
name that is not ours.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.client import RawClient, ServerClosed, job, push_line, uid
from tests.support.processes import REPO, FaktoryServer, GatewayProcess, Process, RedisServer, free_port

OK = b"+OK\r\n"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def server_cert(ca: Path, directory: Path, names: str) -> Path:
    """`directory` gets private.key.pem and public.cert.pem (Faktory's file names), signed by `ca`."""
    directory.mkdir()
    (directory / "ext.cnf").write_text(
        f"subjectAltName={names}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "private.key.pem", "-out", "server.csr", "-subj", "/CN=faktory-test", cwd=directory)  # fmt: skip
    openssl("x509", "-req", "-in", "server.csr", "-CA", str(ca / "ca.pem"), "-CAkey", str(ca / "ca.key"),
            "-CAcreateserial", "-out", "public.cert.pem", "-days", "2", "-extfile", "ext.cnf", cwd=directory)  # fmt: skip
    for name in ("ext.cnf", "server.csr"):
        (directory / name).unlink()
    return directory


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = root / "ca"
    ca.mkdir()
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=faktory-gateway test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=ca)  # fmt: skip
    return {
        "ca": str(ca / "ca.pem"),
        "server": server_cert(ca, root / "server", "IP:127.0.0.1,DNS:localhost"),
        "elsewhere": server_cert(ca, root / "elsewhere", "DNS:faktory.example.com"),
    }


def trusting(ca: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca)


def round_trip(url: str, **kwargs) -> None:
    """PUSH one job and FETCH it back through `url`."""
    queue, jid = "tls-" + uid(), "tls-" + uid()
    with RawClient.connect(url, wid="w-" + uid(), **kwargs) as client:
        assert client.call(push_line(job(jid, queue=queue))) == OK
        assert client.json("FETCH " + queue)["jid"] == jid


# --- (a) the gateway as a TLS client of Faktory -----------------------------------------------------


@pytest.fixture(scope="module")
def tls_faktory(pki):
    server = FaktoryServer(tls_dir=str(pki["server"])).start()
    yield server
    server.cleanup()


def test_the_tls_faktory_refuses_plain_clients(tls_faktory, pki):
    """Without this, the tests below could pass over plain TCP."""
    assert tls_faktory.url.startswith("tcp+tls://")
    with RawClient(f"tcp://127.0.0.1:{tls_faktory.port}", timeout=3) as plain:
        plain.send(b'HELLO {"v":2}\r\n')
        with pytest.raises((ServerClosed, ConnectionError, TimeoutError)):
            assert not plain.read_raw().startswith(b"+HI")
    round_trip(tls_faktory.url, ssl_context=trusting(pki["ca"]))


def upstream_gateway(port: int, *, ca: str | None = None, verify: bool | None = None) -> GatewayProcess:
    env = {"FAKTORY_GATEWAY_UPSTREAM_TLS_CA_FILE": ca or ""}
    if verify is not None:
        env["FAKTORY_GATEWAY_UPSTREAM_TLS_VERIFY"] = str(verify).lower()
    return GatewayProcess(f"tcp+tls://127.0.0.1:{port}", env=env).start()


def test_gateway_reaches_a_tls_faktory_trusting_the_given_ca(tls_faktory, pki):
    gateway = upstream_gateway(tls_faktory.port, ca=pki["ca"])
    try:
        round_trip(gateway.url)
        assert gateway.http("/readiness") == (200, "ok\n")
    finally:
        gateway.stop()


def test_gateway_refuses_a_tls_faktory_it_cannot_verify(tls_faktory, pki):
    gateway = upstream_gateway(tls_faktory.port)  # the system CAs do not know the test CA
    try:
        with RawClient(gateway.url) as client:
            reply = client.read_raw()
            assert reply.startswith(b"-ERR UPSTREAM_UNAVAILABLE "), reply
            assert b"certificate verify failed" in reply
            assert client.is_closed()
    finally:
        gateway.stop()


def test_gateway_refuses_a_tls_faktory_with_another_name(pki):
    server = FaktoryServer(tls_dir=str(pki["elsewhere"])).start()  # signed by the trusted CA
    gateway = upstream_gateway(server.port, ca=pki["ca"])
    try:
        with RawClient(gateway.url) as client:
            reply = client.read_raw()
            assert reply.startswith(b"-ERR UPSTREAM_UNAVAILABLE "), reply
            assert b"IP address mismatch" in reply
    finally:
        gateway.stop()
        server.cleanup()


def test_gateway_skips_verification_only_when_told(tls_faktory):
    gateway = upstream_gateway(tls_faktory.port, verify=False)
    try:
        round_trip(gateway.url)
    finally:
        gateway.stop()


# --- (b) TLS for the gateway's own clients ------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_gateway(faktory, pki):
    env = {
        "FAKTORY_GATEWAY_TLS_CERT_FILE": str(pki["server"] / "public.cert.pem"),
        "FAKTORY_GATEWAY_TLS_KEY_FILE": str(pki["server"] / "private.key.pem"),
    }
    gateway = GatewayProcess(faktory.url, env=env).start()
    yield gateway
    gateway.stop()


def tls_url(gateway: GatewayProcess) -> str:
    return f"tcp+tls://127.0.0.1:{gateway.port}"


def test_a_tls_client_reaches_faktory_through_the_gateway(tls_gateway, pki):
    round_trip(tls_url(tls_gateway), ssl_context=trusting(pki["ca"]))
    with RawClient(tls_url(tls_gateway), ssl_context=trusting(pki["ca"])) as client:
        subject = dict(pair[0] for pair in client.sock.getpeercert()["subject"])
        assert subject["commonName"] == "faktory-test"
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")


def test_a_client_that_does_not_trust_the_certificate_fails(tls_gateway):
    with pytest.raises(ssl.SSLCertVerificationError):
        RawClient(tls_url(tls_gateway), ssl_context=ssl.create_default_context())


def test_pyfaktory_over_tls_through_the_gateway(tls_gateway, pki):
    from pyfaktory import Client, Job, Producer

    queue = "tls-pyfaktory-" + uid()
    with Client(faktory_url=tls_url(tls_gateway), role="producer") as client:
        assert Producer(client).push(Job(jobtype="TlsJob", args=[7], queue=queue))
    with RawClient.connect(tls_url(tls_gateway), ssl_context=trusting(pki["ca"])) as client:
        assert client.json("FETCH " + queue)["args"] == [7]


def test_a_plain_client_gets_nothing_from_the_tls_port(tls_gateway, pki):
    with socket.create_connection(("127.0.0.1", tls_gateway.port), timeout=5) as plain:
        assert not select.select([plain], [], [], 1.0)[0], "no +HI in clear text"
        plain.sendall(b'HELLO {"v":2}\r\n')  # not a TLS ClientHello: the gateway hangs up
        received = b""
        try:
            while chunk := plain.recv(4096):  # at most a TLS alert, then the close
                received += chunk
        except ConnectionResetError:
            pass
        assert b"+HI" not in received and b"+OK" not in received, received
    round_trip(tls_url(tls_gateway), ssl_context=trusting(pki["ca"]))  # and it goes on serving


# --- (c) secrets never shown ------------------------------------------------------------------------

UPSTREAM_PASSWORD, REDIS_PASSWORD = "upw", "rpw"


def assert_no_secret(text: str, where: str) -> None:
    for secret in (UPSTREAM_PASSWORD, REDIS_PASSWORD):
        assert secret not in text, f"{secret!r} shown in {where}:\n{text}"


def run_gateway_cli(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.stdout + result.stderr


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_passwords_in_urls_are_never_printed(log_format):
    faktory = FaktoryServer(password=UPSTREAM_PASSWORD).start()
    redis = RedisServer()
    redis.argv += ["--requirepass", REDIS_PASSWORD]
    redis.start()
    upstream = f"tcp://:{UPSTREAM_PASSWORD}@127.0.0.1:{faktory.port}"
    redis_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis.port}/0"
    gateway = GatewayProcess(
        upstream, "--redis", redis_url, "--log-level", "debug", "--log-format", log_format,
        env={"FAKTORY_GATEWAY_HTTP_QUITQUITQUIT": "true"},
    )  # fmt: skip
    pages = []
    try:
        gateway.start()
        authed = f"tcp://:{UPSTREAM_PASSWORD}@127.0.0.1:{gateway.port}"
        with RawClient.connect(authed) as client:
            assert client.call(push_line(job("plain-" + uid()))) == OK
            reply = client.call(push_line(job("member-" + uid(), custom={"bid": "b-" + uid()})))
            assert reply.startswith(b"-ERR BATCH_UNKNOWN"), reply  # the ledger was asked
            assert client.call("BATCH STATUS b-" + uid()).startswith(b"-ERR")
        with RawClient(gateway.url) as wrong:
            assert wrong.handshake(password="not-it").startswith(b"-ERR")
        pages.append(gateway.http("/metrics")[1])

        redis.stop()  # the ledger goes away: store errors are logged
        with RawClient.connect(authed) as client:
            reply = client.call(push_line(job("member-" + uid(), custom={"bid": "b-" + uid()})))
            assert reply.startswith(b"-ERR STATE_UNAVAILABLE"), reply
        faktory.stop()  # and the upstream: dial errors are logged and sent to the client
        with RawClient(gateway.url) as client:
            reply = client.read_raw()
            assert reply.startswith(b"-ERR UPSTREAM_UNAVAILABLE"), reply
            assert_no_secret(reply.decode(), "the dial error sent to a client")
        for path in ("/metrics", "/readiness", "/liveness", "/startup"):
            pages.append(gateway.http(path)[1])
        assert gateway.http("/quitquitquit", "POST")[0] == 200
        assert gateway.proc.wait(10) in (0, 3)
        time.sleep(0.2)  # the last lines
    finally:
        gateway.stop()
        faktory.cleanup()
        redis.cleanup()
    output = "\n".join(gateway.output)
    # The URLs were printed (redacted), and so were the failures that name them.
    assert f"redis://:***@127.0.0.1:{redis.port}/0" in output, output
    assert f"tcp://:***@127.0.0.1:{faktory.port}" in output, output
    assert "upstream dial failed" in output and "STATE_UNAVAILABLE" in output and "stopped" in output, output
    assert_no_secret(output, "the gateway's log")
    for page in pages:
        assert_no_secret(page, "an HTTP page")


def test_passwords_are_not_printed_by_configuration_errors():
    upstream = f"tcp://:{UPSTREAM_PASSWORD}@127.0.0.1:{free_port()}"
    redis_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0"
    outputs = {
        "--check-config": run_gateway_cli("--upstream", upstream, "--redis", redis_url, "--check-config"),
        "bad mode": run_gateway_cli("--upstream", upstream, "--redis", redis_url, "--mode", "bogus"),
        "bad upstream port": run_gateway_cli("--upstream", f"tcp://:{UPSTREAM_PASSWORD}@127.0.0.1:port"),
        "bad upstream scheme": run_gateway_cli(
            env={"FAKTORY_GATEWAY_UPSTREAM": f"http://:{UPSTREAM_PASSWORD}@127.0.0.1:1"}
        ),
        "bad redis scheme": run_gateway_cli(
            "--upstream", upstream, "--redis", f"http://:{REDIS_PASSWORD}@h:1"
        ),
    }
    for case, output in outputs.items():
        assert output.strip(), case
        assert_no_secret(output, case)
    assert "is not valid" in outputs["bad upstream port"]
    assert "is not valid" in outputs["bad redis scheme"]


def test_no_secret_in_a_busy_gateway_started_through_the_environment():
    """The same, with the URLs in FAKTORY_GATEWAY_UPSTREAM / _REDIS and a store that refuses the password."""
    faktory = FaktoryServer(password=UPSTREAM_PASSWORD).start()
    redis = RedisServer()
    redis.argv += ["--requirepass", "something-else"]
    redis.start()
    gateway = Process(
        [sys.executable, "-m", "gateway", "--listen", f"127.0.0.1:{free_port()}",
         "--http-listen", f"127.0.0.1:{free_port()}", "--log-level", "debug"],
        env={**os.environ, "FAKTORY_GATEWAY_UPSTREAM": f"tcp://:{UPSTREAM_PASSWORD}@127.0.0.1:{faktory.port}",
             "FAKTORY_GATEWAY_REDIS": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis.port}/0"},
        cwd=str(REPO),
    )  # fmt: skip
    try:
        gateway.start()
        line = gateway.wait_for_line("gateway listening")
        port = int(json.loads(line)["message"].rsplit(":", 1)[1])
        with RawClient.connect(f"tcp://:{UPSTREAM_PASSWORD}@127.0.0.1:{port}") as client:
            reply = client.call(push_line(job("member-" + uid(), custom={"bid": "b-" + uid()})))
            assert reply.startswith(b"-ERR STATE_UNAVAILABLE"), reply  # Redis said WRONGPASS
        gateway.send_signal(signal.SIGTERM)
        gateway.proc.wait(10)
    finally:
        gateway.stop()
        faktory.cleanup()
        redis.cleanup()
    output = "\n".join(gateway.output)
    assert f"redis://:***@127.0.0.1:{redis.port}/0" in output and "STATE_UNAVAILABLE" in output, output
    assert_no_secret(output, "the gateway's log")
