"""The served models: which versions the config's version policy asks for, loading and unloading
them, version labels, and resolving a request's ModelSpec to a loaded version.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

import grpc
from tensorflow_serving.apis import get_model_status_pb2

from serving import model_config as model_config_lib
from serving.devserver.errors import ServingError, servable_not_found
from serving.devserver.requests import Limits
from serving.devserver.servable import Servable

logger = logging.getLogger(__name__)

State = get_model_status_pb2.ModelVersionStatus.State


@dataclasses.dataclass
class _VersionStatus:
    state: int
    error_code: int = 0
    error_message: str = ""


class ModelRegistry:
    """Loads the versions a ModelServerConfig asks for and resolves requests to them.

    Args:
        config: The models to serve.
        limits: Per-request caps; `Limits()` when None.
        allow_version_labels_for_unavailable_models: As TF Serving's flag of that name: allow
            labels that point at versions that are not loaded (requests for them get NOT_FOUND).
    """

    def __init__(
        self,
        config: model_config_lib.ModelServerConfig,
        limits: Limits | None = None,
        allow_version_labels_for_unavailable_models: bool = False,
    ):
        self.limits = limits or Limits()
        self.allow_unavailable_labels = allow_version_labels_for_unavailable_models
        self._config = config
        self._lock = threading.Lock()  # guards the maps below; never held while loading
        self._sync_lock = threading.Lock()  # one sync at a time
        self._servables: dict[str, dict[int, Servable]] = {}
        self._statuses: dict[str, dict[int, _VersionStatus]] = {}
        self._labels: dict[str, dict[str, int]] = {}

    @property
    def config(self) -> model_config_lib.ModelServerConfig:
        return self._config

    def sync(self, config: model_config_lib.ModelServerConfig | None = None) -> None:
        """Loads new aspired versions, unloads dropped ones and applies labels.

        Args:
            config: A new config to switch to; None re-scans the version folders only.

        Raises:
            ValueError: If a label points at a version that is not available and
                `allow_version_labels_for_unavailable_models` is off; labels are left unchanged.
        """
        with self._sync_lock:
            config = config if config is not None else self._config
            models = {model.name: model for model in config.model_config_list.config}
            for name in set(self._servables) - set(models):
                self._unload(name, list(self._servables[name]))
            for model in models.values():
                self._sync_model(model)
            labels = self._check_labels(models.values())
            with self._lock:
                self._labels = labels
                self._config = config

    def _sync_model(self, model: model_config_lib.ModelConfig) -> None:
        try:
            on_disk = model_config_lib.list_versions(model.base_path)
        except FileNotFoundError as error:
            logger.warning("model %s: %s; will look again at the next poll", model.name, error)
            on_disk = []
        aspired = model_config_lib.select_versions(model, on_disk)
        loaded = self._servables.get(model.name, {})
        statuses = self._statuses.get(model.name, {})
        for version in aspired:
            # A version that failed to load is not retried (TF Serving gives up after a few
            # retries too); one unloaded cleanly is reloaded, which is what a rollback needs.
            failed = version in statuses and statuses[version].error_code != 0
            if version not in loaded and not failed:
                self._load(model.name, version, os.path.join(model.base_path, str(version)))
        self._unload(model.name, [version for version in loaded if version not in aspired])

    def _load(self, name: str, version: int, path: str) -> None:
        with self._lock:
            self._statuses.setdefault(name, {})[version] = _VersionStatus(State.LOADING)
        logger.info("loading %s version %d from %s", name, version, path)
        try:
            servable = Servable(name, version, path)
            count = servable.replay_warmup(self.limits)
        except Exception as error:  # any failure must leave the server running
            code = error.code if isinstance(error, ServingError) else grpc.StatusCode.UNKNOWN
            message = f"loading {name} version {version} from {path} failed: {error}"
            logger.error("%s", message)
            with self._lock:
                self._statuses[name][version] = _VersionStatus(State.END, code.value[0], message)
            return
        with self._lock:
            self._servables.setdefault(name, {})[version] = servable
            self._statuses[name][version] = _VersionStatus(State.AVAILABLE)
        logger.info("%s version %d AVAILABLE (%d warmup requests replayed)", name, version, count)

    def _unload(self, name: str, versions: list[int]) -> None:
        with self._lock:
            for version in versions:
                # In-flight requests keep their reference; the version is freed when they end.
                self._servables[name].pop(version, None)
                self._statuses[name][version] = _VersionStatus(State.END)
                logger.info("unloaded %s version %d", name, version)

    def _check_labels(self, models) -> dict[str, dict[str, int]]:
        # TF Serving checks labels in ServerCore::ReloadConfig
        # (tensorflow_serving/model_servers/server_core.cc) and refuses the whole config.
        labels = {}
        for model in models:
            available = self._servables.get(model.name, {})
            for label, version in model.version_labels.items():
                if version not in available and not self.allow_unavailable_labels:
                    raise ValueError(
                        f"version label {label!r} of model {model.name!r} points at version "
                        f"{version}, which is not available (loaded: {sorted(available)}); "
                        "load it first or pass --allow_version_labels_for_unavailable_models"
                    )
            labels[model.name] = dict(model.version_labels)
        return labels

    def _version_for(self, model_spec) -> int | None:
        choice = model_spec.WhichOneof("version_choice")
        if choice == "version":
            return model_spec.version.value
        if choice == "version_label":
            version = self._labels.get(model_spec.name, {}).get(model_spec.version_label)
            if version is None:
                # The wording of ServerCore::GetModelVersionForLabel (server_core.cc).
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Unrecognized servable version label: {model_spec.version_label}",
                )
            return version
        return None

    def resolve(self, model_spec) -> Servable:
        """Finds the loaded version a ModelSpec asks for (latest when it names none)."""
        with self._lock:
            version = self._version_for(model_spec)
            versions = self._servables.get(model_spec.name, {})
            if version is None and versions:
                return versions[max(versions)]
            if version in versions:
                return versions[version]
        raise servable_not_found(model_spec.name, version)

    def statuses(self, model_spec) -> list[get_model_status_pb2.ModelVersionStatus]:
        """The version states GetModelStatus reports for a ModelSpec.

        The messages are those of tensorflow_serving/model_servers/get_model_status_impl.cc.
        """
        with self._lock:
            version = self._version_for(model_spec)
            known = self._statuses.get(model_spec.name, {})
            if not known:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find any versions of model {model_spec.name}",
                )
            if version is not None and version not in known:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find version {version} of model {model_spec.name}",
                )
            chosen = [version] if version is not None else sorted(known)
            result = []
            for number in chosen:
                status = known[number]
                entry = get_model_status_pb2.ModelVersionStatus(version=number, state=status.state)
                entry.status.error_code = status.error_code
                entry.status.error_message = status.error_message
                result.append(entry)
            return result

    def unavailable_models(self) -> list[str]:
        """Names of configured models with no AVAILABLE version, with their load errors."""
        problems = []
        with self._lock:
            for model in self._config.model_config_list.config:
                if not self._servables.get(model.name):
                    errors = [s.error_message for s in self._statuses.get(model.name, {}).values()]
                    problems.append(
                        f"{model.name} (base_path {model.base_path}): "
                        + ("; ".join(e for e in errors if e) or "no version folders found")
                    )
        return problems
