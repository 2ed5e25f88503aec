"""Tests of the test launcher (model_server.py): the real-server path and the batching limits.

`tensorflow_model_server` cannot be installed here, so a stand-in binary of that name, which
records its flags, runs the devserver and fails as the real one does, takes its place on PATH.
"""

from __future__ import annotations

import json
import os
import stat
import sys

import grpc
import pytest
from model_server import (
    BATCHING_PARAMETERS_FILE,
    MAX_BATCH_SIZE,
    REPO,
    ServerStartError,
    read_max_batch_size,
    start_model_server,
)

from serving.client import TranslationClient
from serving.model_config import make_model_server_config

STAND_IN = """#!{python}
import json, sys
flags = dict(arg[2:].partition("=")[::2] for arg in sys.argv[1:])
with open({record!r}, "w") as file:
    json.dump(flags, file)
from serving.devserver.errors import ConfigRefusedError
from serving.devserver.server import start_server
try:
    server = start_server(
        flags["model_config_file"],
        port=int(flags["port"]),
        file_system_poll_wait_seconds=float(flags["file_system_poll_wait_seconds"]),
        allow_version_labels_for_unavailable_models=(
            "allow_version_labels_for_unavailable_models" in flags
        ),
    )
except ConfigRefusedError as error:
    # What tensorflow_serving/model_servers/main.cc prints before exiting with -1.
    print(f"Failed to start server. Error: {{error.code.name}}: {{error.message}}", flush=True)
    sys.exit(255)
server.wait()
"""


def install_stand_in(tmp_path, monkeypatch):
    """Puts the stand-in first on PATH; returns the file its flags are recorded in."""
    record = tmp_path / "flags.json"
    binary = tmp_path / "bin" / "tensorflow_model_server"
    binary.parent.mkdir()
    binary.write_text(STAND_IN.format(python=sys.executable, record=str(record)))
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{binary.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", REPO)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    return record


def test_real_server_is_started_with_the_shipped_batching_file_and_the_labels_flag(
    fake_export, tmp_path, monkeypatch
):
    record = install_stand_in(tmp_path, monkeypatch)
    config = make_model_server_config(
        {"labelled": fake_export / "labelled"},
        versions={"labelled": [1, 2]},
        labels={"labelled": {"stable": 1}},
    )
    server = start_model_server(
        config,
        prefer="tensorflow_model_server",
        allow_version_labels_for_unavailable_models=True,
        timeout=120,
    )
    try:
        assert server.kind == "tensorflow_model_server"
        with TranslationClient(server.address, model="labelled", label="stable") as client:
            assert client.translate(["zwei Wörter"]) == ["WÖRTER ZWEI"]
    finally:
        server.stop()
    assert server.process.poll() is not None
    flags = json.loads(record.read_text())
    assert "enable_batching" in flags
    assert flags["batching_parameters_file"] == BATCHING_PARAMETERS_FILE
    assert "allow_version_labels_for_unavailable_models" in flags


def test_real_server_startup_error_carries_its_status(fake_export, tmp_path, monkeypatch):
    # test_parity_table.py reads the code of a refused startup from the server's last words.
    install_stand_in(tmp_path, monkeypatch)
    config = make_model_server_config(
        {"labelled": fake_export / "labelled"}, labels={"labelled": {"stable": 1}}
    )
    with pytest.raises(ServerStartError) as info:
        start_model_server(config, prefer="tensorflow_model_server", timeout=120)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details.startswith("Request to assign label to version 1 of model labelled")


def test_devserver_cap_cannot_diverge_from_the_batching_file(fake_export):
    config = make_model_server_config({"transformer": fake_export / "transformer"})
    with pytest.raises(ValueError, match="batching_parameters.txt"):
        start_model_server(config, prefer="devserver", max_batch_size=MAX_BATCH_SIZE + 1)


def test_max_batch_size_is_read_from_the_field_not_from_comments(tmp_path):
    assert MAX_BATCH_SIZE == read_max_batch_size(BATCHING_PARAMETERS_FILE) > 1
    path = tmp_path / "batching_parameters.txt"
    path.write_text("# max_batch_size { value: 8 }\nmax_batch_size { value: 32 }\n")
    assert read_max_batch_size(path) == 32
    path.write_text("batch_timeout_micros { value: 5000 }\n")
    with pytest.raises(ValueError, match="found 0"):
        read_max_batch_size(path)
