"""Tests of serving.client: batching, error classes, retries and the command line."""

from __future__ import annotations

import io
import threading
import time

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
    assert 0.15 <= elapsed < 10  # slept 0.05 + 0.1 between the three attempts


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
