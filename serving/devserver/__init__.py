"""Development stand-in for TF Serving: serves a models.config over TF Serving's gRPC API.

Not a production server (no REST or metrics); use `tensorflow_model_server`.
Modules: `requests` (validating a PredictRequest), `servable` (one loaded version), `batching`
(`--enable_batching`), `registry` (version policy, labels, loading), `services` (the gRPC
servicers), `server` (lifecycle and polling), `cli` (`python -m serving.devserver`).
"""

from serving.devserver.cli import main
from serving.devserver.errors import ServingError
from serving.devserver.registry import ModelRegistry
from serving.devserver.requests import Limits
from serving.devserver.servable import Servable
from serving.devserver.server import DevServer, start_server

__all__ = [
    "DevServer",
    "Limits",
    "ModelRegistry",
    "Servable",
    "ServingError",
    "main",
    "start_server",
]
