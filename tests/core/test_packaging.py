"""Packaging: the layer library installs with Keras alone and runs on JAX without TensorFlow."""

from __future__ import annotations

import configparser
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What Keras 3 needs on the JAX backend (../shared/NOTES.md), with the packages those import:
# the whole environment of the check below. TensorFlow is deliberately absent.
JAX_ONLY_PACKAGES = (
    "keras",
    "jax",
    "jaxlib",
    "jax_plugins",
    "numpy",
    "numpy.libs",
    "scipy",
    "scipy.libs",
    "ml_dtypes",
    "opt_einsum",
    "optree",
    "namex",
    "absl",
    "rich",
    "markdown_it",
    "mdurl",
    "pygments",
    "h5py",
    "h5py.libs",
    "packaging",
    "typing_extensions.py",
)

CHECK = textwrap.dedent(
    """
    import sys

    import numpy as np

    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("tensorflow is importable: the environment is not JAX-only")

    import keras

    import keras_transformer as kt
    from keras_transformer.cli import main as cli_main

    assert keras.config.backend() == "jax", keras.config.backend()
    keras.utils.set_random_seed(1)
    config = kt.TransformerConfig.preset("tiny")
    model = kt.build_transformer(config)
    model.compile(
        optimizer=kt.transformer_optimizer(config.d_model, warmup_steps=10),
        loss=kt.MaskedLabelSmoothingLoss(0.1),
    )
    source = np.array([[5, 6, 7, 3], [8, 9, 3, 0]], "int32")
    target = np.array([[2, 5, 6, 7], [2, 8, 9, 0]], "int32")
    labels = np.array([[5, 6, 7, 3], [8, 9, 3, 0]], "int32")
    before = [w.copy() for w in model.get_weights()]
    history = model.fit({"source_ids": source, "target_ids": target}, labels, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    greedy = kt.greedy_search(model, source, max_output_length=5)
    beam = kt.beam_search(model, source, beam_size=2, max_output_length=5, num_returned=2)
    assert np.asarray(greedy["target_ids"]).shape == (2, 5)
    assert np.asarray(beam["target_ids"]).shape == (2, 2, 5)
    assert cli_main(["config", "tiny"]) == 0
    try:
        import keras_transformer.translation  # noqa: F401
    except ImportError as error:
        assert "keras-transformer[tf]" in str(error), error
    else:
        raise SystemExit("keras_transformer.translation imported without TensorFlow")
    assert not [name for name in sys.modules if name.startswith("tensorflow")]
    print("JAX-ONLY-OK")
    """
)


def _site_packages() -> Path:
    # Located without importing keras, which on this process' backend imports TensorFlow.
    return Path(importlib.util.find_spec("keras").submodule_search_locations[0]).parent


def test_install_requires_is_the_layer_library_alone():
    """Catches TensorFlow, the serving API, TFDS or sacreBLEU back in install_requires."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    required = [
        line.strip() for line in setup["options"]["install_requires"].splitlines() if line.strip()
    ]
    names = {line.split("[")[0].split("~")[0].split(">")[0].split("=")[0] for line in required}
    assert names == {"keras", "numpy"}, required
    extras = setup["options.extras_require"]
    assert "tensorflow~=2.21.0" in extras["tf"] and "tensorflow-text~=2.21.0" in extras["tf"]
    assert "tensorflow-serving-api~=2.21.0" in extras["serve"]


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_layer_library_trains_and_decodes_on_jax_without_tensorflow(tmp_path):
    """A fresh virtual environment holding only Keras, JAX and their dependencies (linked from
    this environment, so no download) plus the package: catches any import of TensorFlow,
    tensorflow-text or the training/serving code from the layer library, the losses, the
    decoders or the command, and a translation package that fails without naming its extra."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    deps = tmp_path / "deps"
    deps.mkdir()
    source = _site_packages()
    for name in JAX_ONLY_PACKAGES:
        if (source / name).exists():
            (deps / name).symlink_to(source / name)
    for dist_info in source.glob("*.dist-info"):
        if dist_info.name.split("-")[0].lower() in {"keras", "jax", "jaxlib", "numpy", "scipy"}:
            (deps / dist_info.name).symlink_to(dist_info)
    (deps / "keras_transformer").symlink_to(ROOT / "keras_transformer")
    (site / "deps.pth").write_text(f"{deps}\n")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-c", CHECK],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "JAX-ONLY-OK" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-3000:]
    )
