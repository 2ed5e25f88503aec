"""`benchmarks/gpu_training.py` and `benchmarks/profile_gpu_step.py` run end to end on CPU with
tiny shapes; the benchmark compares with a reference only when it ran the same shapes and
precision."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_training import compare, worker_env

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(V=64, D=32, H=4, FF=64, N=2, B=8, L=8)


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")
def test_gpu_training_benchmark_runs_on_cpu_with_tiny_shapes(tmp_path):
    output = tmp_path / "gpu_training.json"
    # torch-compile alone as the reference: the plain Keras one compiles two models (~50 s here).
    command = [sys.executable, "benchmarks/gpu_training.py", "--preset", "tiny", "--batch", "8"]
    command += ["--length", "8", "--steps", "3", "--warmup-steps", "1", "--rounds", "1"]
    command += ["--impls", "ours,torch-compile", "--output", str(output)]
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())

    ours = report["ours"]
    assert ours["status"] == "measured" and ours["shape"] == TINY
    assert ours["target_tokens_per_s"] > 0
    (measured,) = ours["rounds"]
    assert measured["backend"] == "jax" and measured["dtype"] == "mixed_bfloat16"
    assert measured["timed_steps"] == 3 and measured["loss"] > 0
    assert measured["target_tokens_per_s"] == pytest.approx(8 * 8 / measured["step_s"])

    reference = report["references"]["torch-compile"]
    ratio = report["ratios"]["torch-compile"]
    if importlib.util.find_spec("torch") is None:
        assert reference == {
            "status": "skipped",
            "reason": f"torch is not installed for {sys.executable}",
        }
        assert ratio == {"ratio": None, "reason": "reference skipped"}
    else:
        # The anchor's tiny shape (vocabulary 1000, width 64) is not ours: no ratio.
        assert reference["status"] == "measured"
        assert ratio["ratio"] is None and ratio["reason"].startswith("shapes differ")
    assert report["goal"]["reference"] == "torch-compile" and report["goal"]["met"] is None
    assert "| ours | V64 D32 H4 FF64 N2, 8 x 8 |" in result.stdout


def _reference(shape, tokens_per_s):
    return {"status": "measured", "shape": shape, "target_tokens_per_s": tokens_per_s}


def test_a_ratio_needs_the_same_shapes_and_precision():
    ours = {"shape": TINY, "target_tokens_per_s": 1300.0}
    references = {
        "torch-compile": _reference(TINY, 1000.0),
        "keras-jax": _reference(dict(TINY, V=1000), 1000.0),
        "torch-eager": {"status": "failed", "reason": "CUDA out of memory"},
    }
    ratios, goal = compare(ours, references, "mixed_bfloat16")
    assert ratios["torch-compile"] == {"ratio": pytest.approx(1.3)}
    assert goal == {
        "reference": "torch-compile",
        "min_ratio": 1.3,
        "ratio": pytest.approx(1.3),
        "met": True,
    }
    assert ratios["keras-jax"]["ratio"] is None
    assert "shapes differ" in ratios["keras-jax"]["reason"]
    assert ratios["torch-eager"] == {"ratio": None, "reason": "reference failed"}

    ratios, goal = compare(dict(ours, target_tokens_per_s=1200.0), references, "mixed_bfloat16")
    assert goal["met"] is False and goal["ratio"] == pytest.approx(1.2)

    ratios, goal = compare(ours, references, "float32")
    assert ratios["torch-compile"]["ratio"] is None and goal["met"] is None
    assert goal["reason"] == "precision differs: reference mixed_bfloat16, ours float32"

    ratios, goal = compare(ours, {"keras-jax": references["keras-jax"]}, "mixed_bfloat16")
    assert goal["ratio"] is None and "not requested" in goal["reason"]


def test_training_step_ab_times_every_variant_in_turns(tmp_path):
    """`benchmarks/training_step_ab.py` on the tiny preset: catches a variant that is not the
    model it names (Keras' Adam, Keras' layer norm, the arg-max accuracy or the separate ReLU
    variant still on ours: the benchmark asserts the types), a variant left out of the turns,
    and a missing ratio to the baseline."""
    output = tmp_path / "ab.json"
    command = [sys.executable, "benchmarks/training_step_ab.py", "--preset", "tiny"]
    variants = (
        "keras_adam,keras_ln,argmax_acc,relu_ffn,dropout16,tf_ops,no_dropout,no_layer_norm,ours"
    )
    command += ["--variants", variants, "--steps", "2", "--chunk", "1"]
    command += ["--warmup", "1"]
    command += ["--output", str(output)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert list(report["variants"]) == variants.split(",")
    for variant in report["variants"].values():
        assert variant["steps"] >= 2 and variant["step_s_median"] > 0
        assert variant["speedup_over_keras_adam"] > 0
    assert report["variants"]["keras_adam"]["speedup_over_keras_adam"] == 1.0
    bad = subprocess.run(
        [sys.executable, "benchmarks/training_step_ab.py", "--variants", "ours,fast"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "'ours,fast'" in bad.stderr


def test_training_step_ab_bounds_and_dropout16_are_the_model_they_name():
    """The bound variants and `dropout16` are the model they name, on `small` (whose dropout
    is 0.1): catches `no_dropout` building with the preset's rates, `no_layer_norm` leaving a
    norm in place and `dropout16` leaving the 8-bit masks (each would time our own model)."""
    import keras

    from benchmarks.training_step_ab import build
    from keras_transformer.layers.dropout import Dropout
    from keras_transformer.layers.layer_norm import LayerNorm

    def rates(model):
        return {n.rate for n in model._flatten_layers() if isinstance(n, Dropout)}

    def norms(model):
        return [n for n in model._flatten_layers() if isinstance(n, LayerNorm)]

    ours, _ = build("small", "float32", "ours")
    assert max(rates(ours)) > 0 and norms(ours)
    no_dropout, _ = build("small", "float32", "no_dropout")
    assert rates(no_dropout) == {0.0}
    assert len(norms(no_dropout)) == len(norms(ours))
    no_norm, _ = build("small", "float32", "no_layer_norm")
    assert norms(no_norm) == [] and rates(no_norm) == rates(ours)
    assert no_norm.count_params() < ours.count_params()
    bits = {n.bits for n in ours._flatten_layers() if isinstance(n, Dropout)}
    assert bits == {None}  # dropout_levels' choice: 8 bits at 0.1
    dropout16, _ = build("small", "float32", "dropout16")
    assert {n.bits for n in dropout16._flatten_layers() if isinstance(n, Dropout)} == {16}
    assert rates(dropout16) == rates(ours)
    keras.backend.clear_session()


def test_real_batch_timing_stops_at_the_last_step_not_at_fits_return():
    """`timed_fit` (the real-batch rows' timing): a `fit` that returns late (here a callback
    sleeping in `on_train_end`, as `fit`'s return once waited 10 s there) does not count in
    the steps' seconds but is reported. Catches timing to `fit`'s return (the 20.5-second
    rounds) and the clock not passed to `fit`."""
    import time

    import keras
    import numpy as np
    import tensorflow as tf

    from benchmarks.training_throughput import timed_fit

    class LateReturn(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            time.sleep(0.6)

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    data = tf.data.Dataset.from_tensor_slices((np.ones((12, 4)), np.ones((12, 1)))).batch(4)
    steps, whole = timed_fit(model, data, 3, callbacks=[LateReturn()])
    assert 0 < steps < whole and whole - steps >= 0.55
    assert int(model.optimizer.iterations.numpy()) == 3
    keras.backend.clear_session()


def test_training_throughput_times_the_reference_and_ours_in_turns_in_one_process(tmp_path):
    """`--same-process` on the tiny preset: the reference (the anchor's own model) and ours
    take turns in one process. Catches a ratio inverted or taken against the wrong median,
    a model left out of the turns, and the row missing from the table."""
    output = tmp_path / "throughput.json"
    command = [sys.executable, "benchmarks/training_throughput.py", "--presets", "tiny"]
    command += ["--modes", "float32", "--rounds", "1", "--steps", "tiny=2", "--warmup", "1"]
    command += ["--same-process", "--chunk", "1", "--output", str(output)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    turns = json.loads(output.read_text())["presets"]["tiny"]["same_process"]
    assert turns["timed_steps"] == {"reference": 2, "float32": 2}
    ours = turns["ours"]["float32"]
    assert ours["ratio"] == pytest.approx(
        ours["tgt_tokens_per_s"] / turns["reference_tgt_tokens_per_s"]
    )
    assert "| tiny, same process, turns of 1 steps | 8 x 16 | float32 |" in result.stdout


def test_decoding_rows_are_named_by_export_and_compared_with_the_same_search():
    """Each export's rows carry its precision and XLA compilation in their names, and every
    row of a search is compared with CTranslate2's run of that search and batch (none for the
    uncached loop)."""
    from benchmarks.decoding_throughput import _reference_key, export_label

    # Exports made before the fields existed: float32, op by op, one search at a time.
    assert export_label({}) == "savedmodel_c1"
    assert export_label({"concurrent_searches": 2}) == "savedmodel"
    bf16 = {"compute_dtype": "bfloat16", "concurrent_searches": 2}
    assert export_label(bf16) == "savedmodel_bfloat16"
    assert export_label({**bf16, "concurrent_searches": 4}) == "savedmodel_bfloat16_c4"
    xla = {"compute_dtype": "float32", "jit_compile": True}
    assert export_label({**xla, "concurrent_searches": 2}) == "savedmodel_xla"  # the default
    assert export_label({**xla, "concurrent_searches": 4}) == "savedmodel_xla_c4"
    # One search at a time: set, or an XLA export made before the option existed.
    assert export_label({**xla, "concurrent_searches": 1}) == "savedmodel_xla_c1"
    assert export_label(xla) == "savedmodel_xla_c1"
    assert (
        export_label({"compute_dtype": "bfloat16", "jit_compile": True, "concurrent_searches": 2})
        == "savedmodel_bfloat16_xla"
    )
    labels = ("savedmodel", "savedmodel_bfloat16", "savedmodel_xla", "savedmodel_bfloat16_xla")
    for label in (*labels, "savedmodel_xla_c1", "savedmodel_c1"):
        assert _reference_key(f"{label}_greedy", 1, 4) == "greedy_b1"
        assert _reference_key(f"{label}_beam4", 32, 4) == "beam4_b32"
    assert _reference_key("greedy", 32, 4) == "greedy_b32"  # the in-process rows
    assert _reference_key("greedy_uncached", 1, 4) is None
    assert _reference_key("savedmodel_beam5", 1, 4) is None  # another beam than the reference's


def test_two_exports_of_the_same_settings_are_both_timed(tmp_path):
    """An A/B of two code versions exports the same settings twice: the second export's rows
    get their own names instead of replacing the first's (they once silently did)."""
    from benchmarks.decoding_throughput import _reference_key, export_labels

    records = [{"concurrent_searches": 2}, {"concurrent_searches": 2}, {"jit_compile": True}]
    records.append({"concurrent_searches": 2})
    dirs = []
    for index, record in enumerate(records):
        (tmp_path / f"e{index}" / "assets.extra").mkdir(parents=True)
        (tmp_path / f"e{index}" / "assets.extra" / "export.json").write_text(json.dumps(record))
        dirs.append(tmp_path / f"e{index}")
    labels = export_labels(dirs)
    assert labels == ["savedmodel", "savedmodel#2", "savedmodel_xla_c1", "savedmodel#3"]
    assert _reference_key("savedmodel#2_beam4", 32, 4) == "beam4_b32"


def _fake_export(path, config):
    """An export folder holding only what the benchmark reads for the shape."""
    from keras_transformer.translation.model_dir import TRANSFORMER_CONFIG

    (path / "assets.extra").mkdir(parents=True)
    (path / "assets.extra" / TRANSFORMER_CONFIG).write_text(json.dumps(config.to_dict()))
    return path


def test_the_decoding_reference_runs_the_exports_shape_not_the_presets(tmp_path):
    """A d 128 export is compared with CTranslate2 at d 128: the shape comes from the export,
    exports of two shapes or a `--preset` of another shape are refused, naming the shapes, and
    the mapping names the anchor's own shapes for the presets it knows."""
    from benchmarks.decoding_throughput import anchor_shape, benchmark_config
    from keras_transformer import TransformerConfig

    sys.path.insert(0, str(ROOT.parent / "shared" / "perf"))
    from anchor_common import SHAPES

    assert anchor_shape(TransformerConfig.preset("small")) == SHAPES["small"]
    assert anchor_shape(TransformerConfig.preset("base")) == SHAPES["base"]
    narrow = TransformerConfig.preset("small", d_model=128, ffn_dim=512)
    one = _fake_export(tmp_path / "a", narrow)
    two = _fake_export(tmp_path / "b", narrow)
    assert anchor_shape(benchmark_config([one, two], None)) == dict(SHAPES["small"], D=128, FF=512)
    assert benchmark_config(None, None) == TransformerConfig.preset("small")
    with pytest.raises(SystemExit, match="'D': 128.*'D': 256"):
        benchmark_config(
            [one, _fake_export(tmp_path / "c", TransformerConfig.preset("small"))], None
        )
    with pytest.raises(SystemExit, match="--preset small"):
        benchmark_config([one], "small")


CT2_PYTHON = os.environ.get("CT2_PYTHON", "/tmp/ct2env/bin/python")


@pytest.mark.skipif(not os.path.exists(CT2_PYTHON), reason="no CTranslate2 interpreter")
def test_the_ctranslate2_reference_runs_a_shape_the_anchor_does_not_name(tmp_path):
    from argparse import Namespace

    from benchmarks.decoding_throughput import run_ct2

    args = Namespace(
        ct2_python=CT2_PYTHON, batch_sizes=[1, 2], beam_size=2, source_length=5,
        output_length=6, threads=1,
    )  # fmt: skip
    runs = run_ct2(args, dict(V=50, D=24, H=2, FF=40, NE=1, ND=2))
    assert sorted(runs) == ["beam2_b1", "beam2_b2", "greedy_b1", "greedy_b2"]
    assert all(value > 0 for value in runs.values())
    with pytest.raises(RuntimeError, match="'D': 25"):
        run_ct2(args, dict(V=50, D=25, H=2, FF=40, NE=1, ND=2))  # heads do not divide 25


def test_the_measuring_processes_keep_the_callers_pythonpath():
    # On the GPU machine Keras is found only through PYTHONPATH (`pip install --target`); a
    # worker environment that replaced it failed there with "No module named 'keras'".
    env = worker_env({"PYTHONPATH": "/tmp/site", "HOME": "/root"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/tmp/site"]
    assert env["KERAS_BACKEND"] == "jax" and env["HOME"] == "/root"
    assert worker_env({})["PYTHONPATH"] == str(ROOT)


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")
def test_gpu_step_profile_runs_on_cpu_and_names_the_layers(tmp_path):
    output = tmp_path / "profile.md"
    command = [sys.executable, "benchmarks/profile_gpu_step.py", "--preset", "tiny"]
    command += ["--batch", "8", "--length", "8", "--steps", "2", "--warmup-steps", "1"]
    command += ["--output", str(output)]
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.with_suffix(".json").read_text())
    summary = report["summary"]
    assert report["run"]["shape"] == TINY and report["run"]["traced_steps"] == 2
    categories = {row["key"]: row["ms_per_step"] for row in summary["by_category"]}
    assert categories["matrix products (GEMM kernels, dot fusions)"] > 0
    # The dumped HLO names the source of most ops: the three parts of a step appear. Counted,
    # not timed: the time shares of a tiny step on a loaded CPU moved from 0.19 to 0.55 for
    # the unnamed ops (a CI run failed on it); their count is fixed by the compiled step (a
    # quarter unnamed: layout copies XLA adds; a third while fusions went unnamed).
    passes = {row["key"]: row["count_per_step"] for row in summary["by_pass"]}
    assert {"forward", "backward", "optimizer update"} <= set(passes)
    assert passes.get("(no source name)", 0) / sum(passes.values()) < 0.3
    layers = {row["key"] for row in summary["by_layer"]}
    assert any(key.startswith("backward") and "feed_forward" in key for key in layers)
    shares = sum(row["share"] for row in summary["by_op"])
    assert shares == pytest.approx(1.0)
    assert output.read_text().startswith("# Training step profile on the JAX backend")


def test_a_fusion_without_metadata_takes_the_name_of_what_it_fused(tmp_path):
    from benchmarks.profile_gpu_step import dumped_source_names

    name = "jit(train_step)/transpose(jvp(decoder_layer_1))/feed_forward/inner/reduce_sum"
    (tmp_path / "module_0036.jit_train_step.cpu_after_optimizations.txt").write_text(
        "HloModule jit_train_step, entry_computation_layout={()->bf16[64]}\n\n"
        "%fused_computation.144 (param_0.155: bf16[8,8,64]) -> bf16[64] {\n"
        "  %param_0.155 = bf16[8,8,64]{2,1,0} parameter(0)\n"
        "  %convert.4170 = f32[8,8,64]{2,1,0} convert(%param_0.155)\n"
        "  %constant.571 = f32[] constant(0)\n"
        "  %reduce_sum.761 = f32[64]{0} reduce(%convert.4170, %constant.571), "
        f'dimensions={{0,1}}, to_apply=%region, metadata={{op_name="{name}" stack_frame_id=212}}\n'
        "  ROOT %convert.4169 = bf16[64]{0} convert(%reduce_sum.761)\n"
        "}\n\n"
        "ENTRY %main.1 (p: bf16[8,8,64]) -> bf16[64] {\n"
        "  %p = bf16[8,8,64]{2,1,0} parameter(0)\n"
        "  ROOT %reduce_convert_fusion.1 = bf16[64]{0} fusion(%p), kind=kLoop, "
        "calls=%fused_computation.144\n"
        "  %copy.3 = bf16[64]{0} copy(%reduce_convert_fusion.1)\n"
        "}\n"
    )
    names = dumped_source_names(tmp_path)
    assert names[("jit_train_step", "reduce_convert_fusion.1")] == name
    assert names[("jit_train_step", "reduce_sum.761")] == name
    assert ("jit_train_step", "copy.3") not in names  # nothing to name it by
