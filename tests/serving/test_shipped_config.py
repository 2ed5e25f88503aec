"""The shipped serving files fit together: docker-compose.yml mounts folders, main_job.sh exports
a version that serving/models.config serves, and a server started on exactly the files compose
mounts, with compose's flags, serves that export to a client started at the same time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import yaml
from model_server import REPO, free_port

from serving.devserver.cli import _parser as devserver_parser
from serving.devserver.cli import main as devserver_main
from serving.model_config import main as model_config_main
from serving.model_config import read_model_server_config, select_versions

SERVING = os.path.join(REPO, "serving")
# What the devserver does not have (OPERATIONS.md, "Development server"): REST and metrics.
NOT_IN_DEVSERVER = {"--rest_api_port", "--monitoring_config_file"}


def compose_service() -> dict:
    with open(os.path.join(SERVING, "docker-compose.yml"), encoding="utf-8") as file:
        (service,) = yaml.safe_load(file)["services"].values()
    return service


def host_mounts(service: dict, export_dir: str) -> dict[str, str]:
    """Container path -> host path of each volume, as compose resolves them.

    Relative sources are relative to the compose file's folder; ${EXPORT_DIR...} is the
    variable the user sets, here `export_dir`.
    """
    mounts = {}
    for volume in service["volumes"]:
        match = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::ro|:rw)?", volume)
        assert match, f"cannot read volume {volume!r}"
        source, target = match.groups()
        if source.startswith("${EXPORT_DIR"):
            source = export_dir
        mounts[target] = os.path.normpath(os.path.join(SERVING, source))
    return mounts


def to_host(path: str, mounts: dict[str, str]) -> str:
    for target, source in mounts.items():
        if path == target or path.startswith(target + "/"):
            return source + path[len(target) :]
    raise AssertionError(f"{path} is not under any mounted folder: {sorted(mounts)}")


def main_job_version() -> int:
    with open(os.path.join(REPO, "main_job.sh"), encoding="utf-8") as file:
        versions = re.findall(r"^VERSION=(\d+)$", file.read(), re.MULTILINE)
    assert len(versions) == 1, f"main_job.sh should set VERSION=N once, found {versions}"
    return int(versions[0])


def test_compose_mounts_folders_not_files(tmp_path):
    service = compose_service()
    mounts = host_mounts(service, str(tmp_path))
    for target, source in mounts.items():
        # A single-file mount would keep the old inode when an editor saves by rename.
        assert os.path.isdir(source), f"{source} (mounted at {target}) is not a folder"
    for flag in service["command"]:
        name, _, value = flag.partition("=")
        if value.startswith("/config/"):
            assert os.path.isfile(to_host(value, mounts)), flag


def test_main_job_exports_the_version_the_shipped_config_labels_stable():
    version = main_job_version()
    (model,) = read_model_server_config(
        os.path.join(SERVING, "models.config")
    ).model_config_list.config
    assert select_versions(model, [version]) == [version]
    assert model.version_labels["stable"] == version
    served = select_versions(model, range(1, 100))
    assert set(model.version_labels.values()) <= set(served)


def test_main_job_points_the_shipped_config_at_its_export(tmp_path, capsys):
    # main_job.sh: python -m serving.model_config serving/models.config --base-path ... --output
    output = tmp_path / "models.config"
    args = [os.path.join(SERVING, "models.config"), "--output", str(output)]
    assert model_config_main(args + ["--base-path", "transformer=exports/transformer"]) == 0
    shipped = read_model_server_config(os.path.join(SERVING, "models.config"))
    written = read_model_server_config(output)
    shipped.model_config_list.config[0].base_path = os.path.abspath("exports/transformer")
    assert written == shipped
    assert model_config_main(args + ["--base-path", "other=/x"]) == 1
    assert "names model 'other', which is not in the config" in capsys.readouterr().err


def test_devserver_serves_what_compose_mounts(fake_export, tmp_path):
    """The devserver runs compose's command on compose's mounts; the client starts with it.

    Compose's flags include --allow_version_labels_for_unavailable_models, without which the
    shipped config (it has labels) would be refused at startup, by either server.
    """
    export_dir = tmp_path / "exports"
    shutil.copytree(
        fake_export / "transformer" / "1", export_dir / "transformer" / str(main_job_version())
    )
    service = compose_service()
    mounts = host_mounts(service, str(export_dir))

    args = []
    for flag in service["command"]:
        name, sep, value = flag.partition("=")
        if name in NOT_IN_DEVSERVER:
            continue
        if name == "--port":
            value = str(free_port())
            port = value
        elif value.startswith("/"):
            value = to_host(value, mounts)
        args.append(name + sep + value)
    config = read_model_server_config(to_host("/config/models.config", mounts))
    for model in config.model_config_list.config:
        # The container sees the export folder at /models; here it is where compose mounts from.
        args.append(f"--model_base_path_override={model.name}={to_host(model.base_path, mounts)}")
    _, unknown = devserver_parser().parse_known_args(args)
    assert unknown == [], f"compose passes flags the devserver does not know: {unknown}"
    assert {flag.partition("=")[0] for flag in service["command"]} >= NOT_IN_DEVSERVER

    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    server = subprocess.Popen(
        [sys.executable, "-m", "serving.devserver", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Started at once, as the README recipe does: --wait, not retries, bridges the startup.
        client = subprocess.run(
            [sys.executable, "-m", "serving.client", "--server", f"127.0.0.1:{port}"]
            + ["--label", "stable", "--wait", "120", "--retries", "0"],
            cwd=REPO,
            env=env,
            input="ein kleiner Test\nzwei Wörter\n",
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert client.returncode == 0, client.stderr[-2000:]
        assert client.stdout.splitlines() == ["TEST KLEINER EIN", "WÖRTER ZWEI"]
    finally:
        server.terminate()
        server.communicate(timeout=30)


def test_shipped_config_is_refused_without_the_labels_flag(fake_export, tmp_path, capsys):
    """As by TF Serving (test_parity_table.py): the shipped config has labels, so the command
    refuses it at startup without the flag that compose passes."""
    base = tmp_path / "transformer"
    shutil.copytree(fake_export / "transformer" / "1", base / "1")
    code = devserver_main(
        [
            "--model_config_file=" + os.path.join(SERVING, "models.config"),
            f"--model_base_path_override=transformer={base}",
            "--port=0",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert re.search(
        r"Request to assign label to version \d of model transformer, which is not currently "
        "available for inference",
        captured.err,
    )
