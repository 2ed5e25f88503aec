"""Fixtures serving SavedModels over TF Serving's gRPC API: the real server when installed.

`serve_models(config)` starts `tensorflow_model_server` if it is on PATH, else the devserver, and
returns a handle with `.address`; SERVING_TEST_SERVER=devserver|tensorflow_model_server forces one
(see model_server.py).
"""

from __future__ import annotations

import shutil

import pytest
from fake_model import WARMUP_TEXTS, write_fake_model
from model_server import start_model_server

from serving.model_config import make_model_server_config


@pytest.fixture
def serve_models():
    """Factory `serve_models(config_or_path, **kwargs)` -> a server, stopped after the test.

    The keyword arguments are `model_server.start_model_server`'s.
    """
    servers = []

    def serve(model_config, **kwargs):
        server = start_model_server(model_config, **kwargs)
        servers.append(server)
        return server

    yield serve
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def fake_export(tmp_path_factory):
    """An export base holding the fake model as several models.

    transformer/1 (with a warmup file); labelled/1 and labelled/2 (copies, for labels);
    warmed/1 (a copy only the warmup test calls, so its call count is exact).
    """
    base = tmp_path_factory.mktemp("exports")
    version_dir = write_fake_model(base / "transformer", 1, warmup=WARMUP_TEXTS)
    for name, version in (("labelled", 1), ("labelled", 2), ("warmed", 1)):
        shutil.copytree(version_dir, base / name / str(version))
    return base


# Labels of the session server's "labelled" model: "next" names a version that is never
# exported, which only --allow_version_labels_for_unavailable_models permits.
LABELS = {"stable": 1, "canary": 2, "next": 3}


@pytest.fixture(scope="session")
def model_server(fake_export):
    """One server for the session, serving the models of `fake_export`.

    Started with --allow_version_labels_for_unavailable_models, as in production: TF Serving
    checks labels before it loads anything, so without the flag this config would not start.
    """
    config = make_model_server_config(
        {name: fake_export / name for name in ("transformer", "labelled", "warmed")},
        versions={"labelled": [1, 2, 3]},
        labels={"labelled": LABELS},
    )
    server = start_model_server(config, allow_version_labels_for_unavailable_models=True)
    yield server
    server.stop()
