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
from serving.devserver.errors import ConfigRefusedError, ServingError, servable_not_found
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
        allow_version_labels_for_unavailable_models: As TF Serving's flag of that name: a new
            label may point at a version that is not loaded (requests for it get NOT_FOUND);
            moving an existing label still needs its new version loaded.
        xla_cpu_compilation_enabled: As TF Serving's flag (see `Servable`).
    """

    def __init__(
        self,
        config: model_config_lib.ModelServerConfig,
        limits: Limits | None = None,
        allow_version_labels_for_unavailable_models: bool = False,
        xla_cpu_compilation_enabled: bool = False,
    ):
        self.limits = limits or Limits()
        self.allow_unavailable_labels = allow_version_labels_for_unavailable_models
        self.xla_cpu_compilation_enabled = xla_cpu_compilation_enabled
        self._config = config
        self._lock = threading.Lock()  # guards the maps below; never held while loading
        self._sync_lock = threading.Lock()  # one sync at a time
        self._servables: dict[str, dict[int, Servable]] = {}
        self._statuses: dict[str, dict[int, _VersionStatus]] = {}
        # None until the first config is applied (TF Serving's CONFIG_NOT_SET).
        self._labels: dict[str, dict[str, int]] | None = None

    @property
    def config(self) -> model_config_lib.ModelServerConfig:
        return self._config

    def sync(self, config: model_config_lib.ModelServerConfig | None = None) -> None:
        """Applies a config, or re-scans the version folders, as TF Serving does.

        With a config (and on the first call, with the constructor's), this is TF Serving's
        `ServerCore::ReloadConfig` (tensorflow_serving/model_servers/server_core.cc): the config
        is validated, then the version labels are checked against the versions AVAILABLE *now*
        (`UpdateModelVersionLabelMap`), and only then are new versions loaded and dropped ones
        unloaded (`AddModelsViaModelConfigList`). So a label naming a version that this very
        config adds is refused, and at startup, when nothing is loaded yet, every label is
        refused unless `allow_version_labels_for_unavailable_models` is on. A refused config
        changes nothing: the previous one keeps serving.

        Without a config (after the first call), this is the file-system poll of TF Serving's
        `FileSystemStoragePathSource`: versions appear and disappear, labels are not checked.

        Args:
            config: A new config to switch to; None re-scans the version folders only.

        Raises:
            ConfigRefusedError: With TF Serving's status code and message, if the config is
                refused; nothing is changed.
        """
        with self._sync_lock:
            if config is None and self._labels is not None:
                self._sync_versions(self._config)
                return
            config = config if config is not None else self._config
            validate_model_config_list(config)
            labels = self._check_labels(config)
            with self._lock:
                self._labels = labels
                self._config = config
            self._sync_versions(config)

    def reload_config(self, config: model_config_lib.ModelServerConfig) -> None:
        """`ModelService.HandleReloadConfigRequest`: applies `config` and, as `ReloadConfig`
        does for models the config adds (`WaitUntilModelsAvailable`), fails with UNKNOWN when
        one of them has no AVAILABLE version.

        Raises:
            ConfigRefusedError: If the config is refused or a new model did not load.
        """
        with self._lock:
            before = {model.name for model in self._config.model_config_list.config}
        self.sync(config)
        new_models = [m for m in config.model_config_list.config if m.name not in before]
        problems = self.unavailable_models(new_models)
        if problems:
            raise ConfigRefusedError(
                grpc.StatusCode.UNKNOWN,
                f"{len(problems)} model(s) did not become available: {{"
                + ", ".join(problems)
                + "}",
            )

    def _sync_versions(self, config: model_config_lib.ModelServerConfig) -> None:
        models = {model.name: model for model in config.model_config_list.config}
        for name in set(self._servables) - set(models):
            self._unload(name, list(self._servables[name]))
        for model in models.values():
            self._sync_model(model)

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
        # AvailabilityPreservingPolicy (tensorflow_serving/core/availability_preserving_policy.cc,
        # the policy of model_servers/server.cc): versions the policy dropped are unloaded once
        # an aspired one is AVAILABLE (or none is aspired); until then the newest keeps serving,
        # so a new version that fails to load leaves the previous one in service.
        dropped = sorted(version for version in loaded if version not in aspired)
        if aspired and not any(version in loaded for version in aspired):
            dropped = dropped[:-1]
        self._unload(model.name, dropped)

    def _load(self, name: str, version: int, path: str) -> None:
        with self._lock:
            self._statuses.setdefault(name, {})[version] = _VersionStatus(State.LOADING)
        logger.info("loading %s version %d from %s", name, version, path)
        try:
            servable = Servable(name, version, path, self.xla_cpu_compilation_enabled)
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

    def _check_labels(self, config) -> dict[str, dict[str, int]]:
        # ServerCore::UpdateModelVersionLabelMap (server_core.cc), run before any version of
        # the new config is loaded. A label may point at a version that is not AVAILABLE only
        # with allow_version_labels_for_unavailable_models, and even then not when the label
        # already exists and points elsewhere: moving a label needs the target loaded.
        labels = {}
        with self._lock:
            available = {name: set(versions) for name, versions in self._servables.items()}
            current = self._labels or {}
        for model in config.model_config_list.config:
            for label, version in model.version_labels.items():
                allow_unavailable = False
                if self.allow_unavailable_labels:
                    existing = current.get(model.name, {}).get(label)
                    allow_unavailable = existing is None or existing == version
                if not allow_unavailable and version not in available.get(model.name, ()):
                    raise ConfigRefusedError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"Request to assign label to version {version} of model "
                        f"{model.name}, which is not currently available for inference "
                        f"(label {label!r}; available: "
                        f"{sorted(available.get(model.name, ()))}; see "
                        "--allow_version_labels_for_unavailable_models)",
                    )
                labels.setdefault(model.name, {})[label] = version
        return labels

    def _version_for(self, model_spec) -> int | None:
        # ServerCore::ServableRequestFromModelSpec and GetModelVersionForLabel (server_core.cc).
        if not model_spec.name:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified.")
        choice = model_spec.WhichOneof("version_choice")
        if choice == "version":
            return model_spec.version.value
        if choice == "version_label":
            version = (self._labels or {}).get(model_spec.name, {}).get(model_spec.version_label)
            if version is None:
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

        As `GetModelStatusImpl::GetModelStatusWithModelSpec`
        (tensorflow_serving/model_servers/get_model_status_impl.cc): a version number selects
        that version; anything else, a `version_label` included, selects every version, newest
        first (`ServableStateMonitor::VersionMap` is ordered by `std::greater`). The model name
        is not checked for emptiness there, so "" is NOT_FOUND like any unknown model.
        """
        with self._lock:
            known = self._statuses.get(model_spec.name, {})
            if model_spec.WhichOneof("version_choice") == "version":
                version = model_spec.version.value
                if version not in known:
                    raise ServingError(
                        grpc.StatusCode.NOT_FOUND,
                        f"Could not find version {version} of model {model_spec.name}",
                    )
                chosen = [version]
            else:
                if not known:
                    raise ServingError(
                        grpc.StatusCode.NOT_FOUND,
                        f"Could not find any versions of model {model_spec.name}",
                    )
                chosen = sorted(known, reverse=True)
            result = []
            for number in chosen:
                status = known[number]
                entry = get_model_status_pb2.ModelVersionStatus(version=number, state=status.state)
                entry.status.error_code = status.error_code
                entry.status.error_message = status.error_message
                result.append(entry)
            return result

    def unavailable_models(self, models=None) -> list[str]:
        """Configured models (or `models`) with no AVAILABLE version, with their load errors."""
        problems = []
        with self._lock:
            for model in self._config.model_config_list.config if models is None else models:
                if not self._servables.get(model.name):
                    errors = [s.error_message for s in self._statuses.get(model.name, {}).values()]
                    problems.append(
                        f"{model.name} (base_path {model.base_path}): "
                        + ("; ".join(e for e in errors if e) or "no version folders found")
                    )
        return problems


def validate_model_config_list(config: model_config_lib.ModelServerConfig) -> None:
    """What `ValidateModelConfigList` (server_core.cc) refuses beyond what parsing refuses.

    TF Serving (without --model_config_list_root_dir) requires absolute base paths; a relative
    one would resolve against whatever directory the server happens to run in.

    Raises:
        ConfigRefusedError: INVALID_ARGUMENT with TF Serving's message.
    """
    names = set()
    for model in config.model_config_list.config:
        if model.name in names:
            raise ConfigRefusedError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Illegal to list model {model.name} multiple times in config list",
            )
        names.add(model.name)
        if "://" not in model.base_path and not os.path.isabs(model.base_path):
            raise ConfigRefusedError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Expected model {model.name} to have an absolute path or URI; got "
                f"base_path()={model.base_path}",
            )
