"""Read TF Serving's models.config and decide which version folders it serves.

The devserver uses this so that it serves exactly the versions `tensorflow_model_server` would.
As a command, it writes a copy of a config with other base paths, so that one config serves
container paths (/models/...) in docker-compose and local folders elsewhere:

python -m serving.model_config serving/models.config --base-path transformer=DIR --output FILE
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

ModelServerConfig = model_server_config_pb2.ModelServerConfig
ModelConfig = model_server_config_pb2.ModelConfig


def parse_model_server_config(text: str, source: str = "<string>") -> ModelServerConfig:
    """Parses a models.config text proto and checks what TF Serving would reject.

    Args:
        text: The text-format `ModelServerConfig`.
        source: Where the text came from, used in error messages.

    Returns:
        The parsed `ModelServerConfig`.

    Raises:
        ValueError: If the text does not parse, has no `model_config_list`, or a model has no
            name, no base_path, a platform other than "tensorflow" or a duplicate name.
    """
    config = ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ValueError(f"{source} is not a valid ModelServerConfig text proto: {error}") from None
    check_model_server_config(config, source)
    return config


def check_model_server_config(config: ModelServerConfig, source: str = "<config>") -> None:
    """Checks a parsed config as `parse_model_server_config` does; see there.

    Raises:
        ValueError: Naming `source` and the problem.
    """
    if not config.HasField("model_config_list"):
        raise ValueError(
            f"{source} has no model_config_list; only model_config_list configs are supported, "
            f"got {config.WhichOneof('config') or 'an empty config'}"
        )
    seen = set()
    for model in config.model_config_list.config:
        if not model.name:
            raise ValueError(f"{source}: a model config has no name: {model}")
        if model.name in seen:
            raise ValueError(f"{source}: model name {model.name!r} appears more than once")
        seen.add(model.name)
        if not model.base_path:
            raise ValueError(f"{source}: model {model.name!r} has no base_path")
        if model.model_platform not in ("", "tensorflow"):
            raise ValueError(
                f"{source}: model {model.name!r} has model_platform "
                f"{model.model_platform!r}; only 'tensorflow' is supported"
            )


def read_model_server_config(path: str | os.PathLike) -> ModelServerConfig:
    """Reads and parses a models.config file; see `parse_model_server_config`."""
    with open(path, encoding="utf-8") as file:
        return parse_model_server_config(file.read(), source=str(path))


def write_model_server_config(config: ModelServerConfig, path: str | os.PathLike) -> None:
    """Writes `config` as a text proto that both TF Serving and the devserver read."""
    with open(path, "w", encoding="utf-8") as file:
        file.write(text_format.MessageToString(config))


def make_model_server_config(
    models: Mapping[str, str | os.PathLike],
    versions: Mapping[str, Iterable[int]] | None = None,
    labels: Mapping[str, Mapping[str, int]] | None = None,
) -> ModelServerConfig:
    """Builds a config serving each model from its base path.

    Args:
        models: Model name to base path (the folder that holds the numeric version folders).
        versions: Optional model name to the specific versions to serve; models not listed
            serve their latest version, TF Serving's default policy.
        labels: Optional model name to a `{label: version}` map.

    Returns:
        A `ModelServerConfig` with one `model_config_list` entry per model.
    """
    config = ModelServerConfig()
    for name, base_path in models.items():
        # TF Serving refuses relative base paths (ValidateModelConfigList, server_core.cc).
        model = config.model_config_list.config.add(
            name=name, base_path=os.path.abspath(base_path), model_platform="tensorflow"
        )
        if versions and name in versions:
            model.model_version_policy.specific.versions.extend(versions[name])
        for label, version in ((labels or {}).get(name) or {}).items():
            model.version_labels[label] = version
    return config


def apply_base_path_overrides(
    config: ModelServerConfig, overrides: Mapping[str, str | os.PathLike]
) -> ModelServerConfig:
    """Returns a copy of `config` with the base_path of some models replaced.

    The production config names container paths such as /models/transformer; overrides let the
    same file serve a local export folder.

    Raises:
        ValueError: If an override names a model that is not in the config.
    """
    result = ModelServerConfig()
    result.CopyFrom(config)
    names = {model.name: model for model in result.model_config_list.config}
    for name, base_path in overrides.items():
        if name not in names:
            raise ValueError(
                f"base path override names model {name!r}, which is not in the config; "
                f"models: {sorted(names)}"
            )
        names[name].base_path = os.path.abspath(base_path)
    return result


def list_versions(base_path: str | os.PathLike) -> list[int]:
    """Lists the version folders under `base_path`, as TF Serving's file system source does.

    Only folders whose whole name is a non-negative integer count; anything else (a half-copied
    "2.tmp", "latest") is ignored, which is what makes an atomic rename the safe way to publish.

    Raises:
        FileNotFoundError: If `base_path` does not exist.
    """
    if not os.path.isdir(base_path):
        raise FileNotFoundError(f"model base_path {os.fspath(base_path)!r} is not a directory")
    versions = []
    for entry in os.scandir(base_path):
        if entry.is_dir() and entry.name.isdigit():
            versions.append(int(entry.name))
    return sorted(versions)


def select_versions(model: ModelConfig, available: Iterable[int]) -> list[int]:
    """Applies the model's version policy to the versions found on disk.

    Args:
        model: One model's config.
        available: The version numbers present under its base_path.

    Returns:
        The versions to serve, ascending. Policy `latest` (the default, N=1 when unset) keeps the N
        highest; `all` keeps every one; `specific` keeps the listed ones that exist.
    """
    available = sorted(set(available))
    policy = model.model_version_policy.WhichOneof("policy_choice")
    if policy == "all":
        return available
    if policy == "specific":
        wanted = set(model.model_version_policy.specific.versions)
        return [version for version in available if version in wanted]
    num_versions = model.model_version_policy.latest.num_versions or 1
    return available[-num_versions:]


def main(argv: list[str] | None = None) -> int:
    """Writes CONFIG with some base paths replaced to --output; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m serving.model_config",
        description="Copy a models.config with other (absolute) base paths, e.g. the shipped "
        "config (container paths) pointed at a local export folder.",
    )
    parser.add_argument("config", help="models.config to copy")
    parser.add_argument(
        "--base-path",
        action="append",
        default=[],
        metavar="NAME=DIR",
        required=True,
        help="serve model NAME from DIR (made absolute); repeatable",
    )
    parser.add_argument("--output", required=True, help="file to write")
    args = parser.parse_args(argv)
    overrides = {}
    for text in args.base_path:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            parser.error(f"--base-path: expected NAME=DIR, got {text!r}")
        overrides[name] = path
    try:
        config = apply_base_path_overrides(read_model_server_config(args.config), overrides)
        write_model_server_config(config, args.output)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
