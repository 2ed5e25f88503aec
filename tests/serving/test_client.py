"""Tests of serving.client: batching, error classes, retries and the command line."""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import threading
import time
from concurrent import futures

import grpc
import pytest
from fake_model import fake_translate
from model_server import MAX_BATCH_SIZE, free_port

from serving import client as client_lib
from serving import devserver
from serving.client import (
    InvalidInputError,
    ModelNotFoundError,
    ServerUnavailableError,
    SignatureNotFoundError,
    TranslationClient,
)
from serving.devserver.registry import ModelRegistry
from serving.devserver.services import ServingServicer
from serving.model_config import make_model_server_config


def call_count(address: str) -> int:
    with TranslationClient(address) as client:
        return int(client.predict({"text": ["x"]}, signature="call_count")["count"][0])


def test_translate_splits_lines_into_batches_in_order(model_server):
    lines = [f"line number {n}" for n in range(10)]
    before = call_count(model_server.address)
    with TranslationClient(model_server.address, max_batch_size=3) as client:
        assert client.translate(lines) == [fake_translate(line) for line in lines]
    assert call_count(model_server.address) - before == 4  # 3 + 3 + 3 + 1 lines


@pytest.mark.parametrize("signature", ["serving_default", "greedy", "beam"])
def test_translate_with_each_text_signature(model_server, signature):
    with TranslationClient(model_server.address, signature=signature) as client:
        assert client.translate(["guten Morgen", ""]) == ["MORGEN GUTEN", ""]


def test_translate_nothing_sends_nothing(model_server):
    before = call_count(model_server.address)
    with TranslationClient(model_server.address) as client:
        assert client.translate([]) == []
    assert call_count(model_server.address) == before


def test_translate_rejects_a_bare_string():
    client = TranslationClient("127.0.0.1:1")
    with pytest.raises(TypeError, match="not one string"):
        client.translate("a sentence")
    with pytest.raises(TypeError, match=r"lines\[1\] is int"):
        client.translate(["a", 3])
    client.close()


def test_version_and_label_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        TranslationClient(version=1, label="stable")


@pytest.mark.parametrize(
    "client_kwargs, error_class, words",
    [
        ({"model": "nope"}, ModelNotFoundError, ["'nope'", "Latest(nope)"]),
        ({"version": 9}, ModelNotFoundError, ["version 9", "Specific(transformer, 9)"]),
        ({"signature": "sample"}, SignatureNotFoundError, ['"sample" not found']),
        ({"max_batch_size": MAX_BATCH_SIZE + 1}, InvalidInputError, [str(MAX_BATCH_SIZE)]),
    ],
    ids=["model", "version", "signature", "batch"],
)
def test_errors_say_what_went_wrong(model_server, client_kwargs, error_class, words):
    client = TranslationClient(model_server.address, **client_kwargs)
    with pytest.raises(error_class) as info:
        client.translate(["a"] * (MAX_BATCH_SIZE + 1))
    client.close()
    message = str(info.value)
    assert model_server.address in message
    for word in words:
        assert word in message


def test_server_down_is_reported_with_the_address_after_retries():
    address = f"127.0.0.1:{free_port()}"
    client = TranslationClient(address, retries=2, backoff=0.05, timeout=2)
    start = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="after 3 attempts") as info:
        client.translate(["a"])
    elapsed = time.monotonic() - start
    client.close()
    assert address in str(info.value)
    # Slept between the three attempts: 0.025-0.05 s, then 0.05-0.1 s (jittered).
    assert 0.075 <= elapsed < 10


def test_unavailable_is_retried_until_the_server_is_up(fake_export):
    port = free_port()
    servers = []

    def start_later():
        time.sleep(0.5)
        config = make_model_server_config({"transformer": fake_export / "transformer"})
        servers.append(devserver.start_server(config, port=port))

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        client = TranslationClient(f"127.0.0.1:{port}", retries=8, backoff=0.2, timeout=10)
        assert client.translate(["es klappt"]) == ["KLAPPT ES"]
        client.close()
    finally:
        thread.join()
        for server in servers:
            server.stop()


def test_command_translates_arguments_and_stdin(model_server, monkeypatch, capsys):
    assert client_lib.main(["--server", model_server.address, "hallo Welt", "a b"]) == 0
    assert capsys.readouterr().out.splitlines() == ["WELT HALLO", "B A"]
    monkeypatch.setattr("sys.stdin", io.StringIO("eins zwei\r\n\ndrei\n"))
    assert client_lib.main(["--server", model_server.address, "--batch-size", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == ["ZWEI EINS", "", "DREI"]


def test_command_fails_with_one_line(model_server, capsys):
    code = client_lib.main(["--server", model_server.address, "--model", "nope", "x"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("error: model 'nope'")


def test_backoff_is_jittered_within_bounds():
    rng = random.Random(0)
    for attempt, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (5, 10.0), (9, 10.0)]:
        delays = [client_lib.backoff_delay(attempt, 0.5, 10.0, rng) for _ in range(50)]
        assert all(cap / 2 <= delay <= cap for delay in delays), (attempt, delays)
        assert len(set(delays)) == len(delays)  # clients that failed together spread out


def test_retries_sleep_the_jittered_delays(monkeypatch):
    slept = []
    monkeypatch.setattr(client_lib.time, "sleep", slept.append)
    address = f"127.0.0.1:{free_port()}"
    client = TranslationClient(address, retries=4, backoff=0.2, max_backoff=0.5, timeout=2)
    with client, pytest.raises(ServerUnavailableError, match="after 5 attempts"):
        client.translate(["a"])
    assert len(slept) == 4
    for attempt, delay in enumerate(slept):
        cap = min(0.5, 0.2 * 2**attempt)
        assert cap / 2 <= delay <= cap
    assert slept != [0.2, 0.4, 0.5, 0.5]


def test_client_options_are_checked():
    with pytest.raises(ValueError, match="tls is off"):
        TranslationClient(ca_file="ca.pem")
    with pytest.raises(ValueError, match="cannot read ca_file"):
        TranslationClient(tls=True, ca_file="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="backoff"):
        TranslationClient(backoff=2.0, max_backoff=1.0)


def self_signed_certificate(directory):
    """A key and a self-signed certificate for localhost and 127.0.0.1 (PEM bytes)."""
    key, cert = directory / "key.pem", directory / "cert.pem"
    try:
        from cryptography import x509  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl command is installed")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
            + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"]
            + ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True,
            capture_output=True,
        )
        return key.read_bytes(), cert.read_bytes()
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(private_key, hashes.SHA256())
    )
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def tls_server(fake_export, tmp_path):
    """The devserver's services on a TLS port, as TF Serving with --ssl_config_file serves
    them; yields (address, CA file)."""
    key, cert = self_signed_certificate(tmp_path)
    (tmp_path / "ca.pem").write_bytes(cert)
    registry = ModelRegistry(make_model_server_config({"transformer": fake_export / "transformer"}))
    registry.sync()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ServingServicer(registry).add_to_server(server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    yield f"127.0.0.1:{port}", str(tmp_path / "ca.pem")
    server.stop(None)


def test_tls_with_a_ca_file(tls_server, capsys):
    address, ca_file = tls_server
    with TranslationClient(address, tls=True, ca_file=ca_file, retries=0) as client:
        assert client.translate(["sicher ist sicher"]) == ["SICHER IST SICHER"]
    assert client_lib.main(["--server", address, "--tls", "--ca-file", ca_file, "a b"]) == 0
    assert capsys.readouterr().out == "B A\n"
    # The certificate is really checked: not trusted without the CA file, and plaintext fails.
    for kwargs in ({"tls": True}, {}):
        client = TranslationClient(address, retries=0, timeout=5, **kwargs)
        with client, pytest.raises(ServerUnavailableError):
            client.translate(["a"])


def test_ca_file_needs_tls_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as info:
        client_lib.main(["--ca-file", "ca.pem", "x"])
    assert info.value.code == 2
    assert "--ca-file needs --tls" in capsys.readouterr().err


def test_model_version_flag(model_server, capsys):
    args = ["--server", model_server.address, "--model", "labelled"]
    assert client_lib.main(args + ["--model-version", "1", "a b"]) == 0
    assert capsys.readouterr().out == "B A\n"
    assert client_lib.main(args + ["--model-version", "7", "a b"]) == 1
    assert "Specific(labelled, 7)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # nothing is called --version any more
        client_lib.main(args + ["--version", "1", "a b"])


def test_wait_lets_the_client_start_before_the_server(fake_export, capsys):
    port = free_port()
    servers = []

    def start_later():
        time.sleep(1.0)
        config = make_model_server_config({"transformer": fake_export / "transformer"})
        servers.append(devserver.start_server(config, port=port))

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        # No retries: only --wait carries the client over the server's startup.
        args = ["--server", f"127.0.0.1:{port}", "--retries", "0", "--wait", "60"]
        assert client_lib.main(args + ["es klappt"]) == 0
        assert capsys.readouterr().out == "KLAPPT ES\n"
    finally:
        thread.join()
        for server in servers:
            server.stop()


def test_wait_gives_up_with_the_last_answer(capsys):
    start = time.monotonic()
    code = client_lib.main(["--server", f"127.0.0.1:{free_port()}", "--wait", "0.5", "x"])
    assert code == 1
    assert time.monotonic() - start < 10
    error = capsys.readouterr().err
    assert "not AVAILABLE after waiting 0.5 s" in error and "unavailable" in error


def test_wait_for_a_pinned_version_that_is_not_served(model_server):
    client = TranslationClient(model_server.address, model="labelled", version=3)
    with client, pytest.raises(ServerUnavailableError, match="Could not find version 3 of model"):
        client.wait_until_available(0.5)
