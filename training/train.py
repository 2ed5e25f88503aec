"""`python -m training.train --config FILE.yaml [--set key=value ...]`: train with `model.fit`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from keras_transformer.translation import model_dir as layout
from quiet_logs import add_verbose_argument
from training import distributed
from training.corpus import CorpusError
from training.run_config import ConfigError, RunConfig, dump_run_config, load_run_config


def _spec(corpus) -> dict:
    """A corpus entry of the config: a spec string or a `{"spec": ..., options}` block."""
    return {"spec": corpus} if isinstance(corpus, str) else dict(corpus)


def compile_model(model, config, opts):
    """Compiles `model` for training as every run does (also what the training benchmark
    times): label-smoothed loss, the paper's Adam schedule, token accuracy and a count of the
    target tokens, which it returns (the progress log reads it)."""
    from keras_transformer import (
        MaskedLabelSmoothingLoss,
        MaskedTokenAccuracy,
        transformer_optimizer,
    )
    from training import callbacks as cb

    # The cooldown (training.callbacks.Cooldown) scales the rate through this variable; passed
    # only when on, so the Keras Adam that benchmarks/training_step_ab.py swaps in still builds.
    extra = {"rate_multiplier": True} if opts.cooldown_fraction > 0 else {}
    optimizer = transformer_optimizer(
        config.d_model,
        warmup_steps=opts.warmup_steps,
        scale=opts.learning_rate_scale,
        gradient_accumulation_steps=(
            opts.gradient_accumulation_steps if opts.gradient_accumulation_steps > 1 else None
        ),
        **extra,
    )
    token_count = cb.TokenCount(config.pad_id)
    model.compile(
        optimizer=optimizer,
        loss=MaskedLabelSmoothingLoss(config.label_smoothing, pad_id=config.pad_id),
        metrics=[MaskedTokenAccuracy(pad_id=config.pad_id), token_count],
        jit_compile=opts.jit_compile,
    )
    return token_count


# CPU features with bfloat16 matrix instructions (Linux /proc/cpuinfo names). Without them
# TensorFlow emulates bf16 and `mixed_bfloat16` ran at 0.93x of float32 on an AVX2-only EPYC;
# with AVX512_BF16 it ran at 1.2-1.4x (benchmarks/results/training_throughput*.json).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags (empty where /proc/cpuinfo is absent)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def accelerator_has_bf16() -> bool | None:
    """Whether the accelerator the run trains on multiplies bfloat16 natively; `None`: the run
    trains on the CPU."""
    import keras

    if keras.config.backend() == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform == "cpu":
            return None
        if device.platform == "tpu":
            return True
        capability = getattr(device, "compute_capability", "0")
        return float(capability) >= 8.0
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
    return tuple(capability or (0, 0)) >= (8, 0)


def resolve_mixed_precision(mixed_precision, flags: set[str], accelerator_bf16: bool | None):
    """`train.mixed_precision` as a run uses it: `"auto"` becomes `"mixed_bfloat16"` where the
    hardware multiplies bfloat16 natively (an accelerator that does, or, training on the CPU,
    one of `BF16_CPU_FLAGS` in `flags`) and `None` (float32) elsewhere; a policy name or `None`
    is returned as it is."""
    if mixed_precision != "auto":
        return mixed_precision
    native = accelerator_bf16 if accelerator_bf16 is not None else bool(flags & BF16_CPU_FLAGS)
    return "mixed_bfloat16" if native else None


def _precision_reason(mixed_precision, flags, accelerator_bf16) -> str:
    """Why `resolve_mixed_precision` chose what it did, for the run's log."""
    if mixed_precision != "auto":
        return f"train.mixed_precision {mixed_precision}"
    if accelerator_bf16 is not None:
        return "train.mixed_precision auto: the accelerator " + (
            "multiplies bfloat16 natively" if accelerator_bf16 else "has no native bfloat16"
        )
    found = sorted(flags & BF16_CPU_FLAGS)
    return "train.mixed_precision auto: " + (
        f"this CPU has {', '.join(found)}" if found else "this CPU has no bfloat16 instructions"
    )


# What `data.length_multiple: auto` rounds bucket lengths to where shapes must be fixed.
AUTO_LENGTH_MULTIPLE = 8


def resolve_length_multiple(length_multiple, jit_compile: bool, devices: int) -> int | None:
    """`data.length_multiple` as a run uses it: `"auto"` becomes `None` (each batch padded to
    its longest pair, the fewest padded positions) where no program is compiled per batch
    shape, that is TensorFlow running the train step without XLA on one device, and
    `AUTO_LENGTH_MULTIPLE` elsewhere (JAX and XLA compile per shape; data parallel training
    splits batches by rows). A number or `None` is returned as it is."""
    import keras

    if length_multiple != "auto":
        return length_multiple
    if keras.config.backend() == "tensorflow" and not jit_compile and devices == 1:
        return None
    return AUTO_LENGTH_MULTIPLE


def training_dataset(run_config: RunConfig, corpus, tokenizer, rows_multiple: int = 1):
    """The run's training batches (token budget, buckets, shuffled, repeated), as every run and
    the training benchmark's real-batch case build them. `data.length_multiple` must be
    resolved (`resolve_length_multiple`)."""
    from training.pipeline import make_dataset

    data = run_config.data
    if data.length_multiple == "auto":
        raise ValueError("resolve data.length_multiple 'auto' first (resolve_length_multiple)")
    return make_dataset(
        corpus,
        tokenizer,
        batch_tokens=data.batch_tokens,
        max_length=data.max_length,
        shuffle=True,
        shuffle_buffer=data.shuffle_buffer,
        repeat=True,
        seed=run_config.train.seed,
        cache=data.cache,
        length_multiple=data.length_multiple,
        rows_multiple=rows_multiple,
    )


def _prepare_vocab(run_config: RunConfig, model_dir: Path, train_corpus) -> Path:
    """The run's SentencePiece model, in the model dir: copied from data.vocab or trained."""
    from training.vocab import train_vocab

    target = model_dir / layout.VOCAB
    data = run_config.data
    if target.is_file():
        return target
    if data.vocab:
        source = Path(data.vocab)
        if not source.is_file():
            raise ConfigError(f"data.vocab {source} does not exist")
        target.write_bytes(source.read_bytes())
        return target
    print(f"training a {data.vocab_size}-piece {data.vocab_model_type} vocabulary", flush=True)
    train_vocab(
        train_corpus,
        str(target.with_suffix("")),
        vocab_size=data.vocab_size,
        model_type=data.vocab_model_type,
        sample_size=data.vocab_sample_size,
        seed=run_config.train.seed,
    )
    return target


def _check_same_model(path: Path, config) -> None:
    """A model dir holds one model: resuming with other hyper-parameters is an error."""
    from keras_transformer import TransformerConfig

    if path.is_file():
        existing = TransformerConfig.from_json(path)
        if existing != config:
            changed = {
                key: (value, getattr(config, key))
                for key, value in existing.to_dict().items()
                if getattr(config, key) != value
            }
            raise ConfigError(
                f"{path.parent} already holds a different model (changed: {changed}); "
                "use a new train.model_dir"
            )


def _completed(model_dir: Path, run_config: RunConfig) -> dict | None:
    """The summary of a finished run that this config would not continue, else `None`.

    A run stopped by `max_steps`, `max_minutes` or early stopping is finished for a config
    whose budget it has spent; raising `max_steps` or `max_minutes` (or dropping early
    stopping) continues it.
    """
    marker = model_dir / layout.COMPLETE
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    opts = run_config.train
    spent = done["steps"] >= opts.max_steps or (
        opts.max_minutes is not None and done["train_seconds"] >= opts.max_minutes * 60
    )
    stopped_early = done["reason"] == "early_stopping" and opts.early_stopping_patience
    return done if spent or stopped_early else None


def train(run_config: RunConfig, group: distributed.ProcessGroup | None = None) -> dict:
    """Trains (or resumes, or finds finished) the run; returns its summary.

    `group`: this process' place in a multi-process JAX run (`training.distributed`); one
    process by default.
    """
    group = group or distributed.ProcessGroup()
    # Before anything runs on JAX: joining the process group must come first.
    distributed.initialize(group)
    import keras
    import tensorflow as tf

    from keras_transformer import (
        build_transformer,
    )
    from keras_transformer.translation.tokenizer import SubwordTokenizer, check_vocabulary
    from training import callbacks as cb
    from training.corpus import corpus_from_config
    from training.pipeline import batch_shapes

    data, opts = run_config.data, run_config.train
    model_dir = Path(opts.model_dir)
    chief = group.is_chief
    # Process 0 speaks and writes for the run; the others print only their summary and errors.
    say = print if chief else (lambda *args, **kwargs: None)
    if chief:
        model_dir.mkdir(parents=True, exist_ok=True)
    # The same seed everywhere: every process initializes the same (replicated) weights.
    keras.utils.set_random_seed(opts.seed)
    flags, accelerator_bf16 = cpu_flags(), accelerator_has_bf16()
    precision = resolve_mixed_precision(opts.mixed_precision, flags, accelerator_bf16)
    if precision:
        keras.mixed_precision.set_global_policy(precision)
    say(
        f"precision: {precision or 'float32'} "
        f"({_precision_reason(opts.mixed_precision, flags, accelerator_bf16)})",
        flush=True,
    )
    if keras.config.backend() == "tensorflow":
        from keras_transformer.kernels import native

        say(f"kernels: {native.describe()}", flush=True)
    devices = distributed.data_parallel_devices()
    if devices > 1 and data.length_multiple is None:
        raise ConfigError(
            f"data parallel training on {devices} devices splits every batch by rows and needs "
            "fixed batch shapes: set data.length_multiple (e.g. 8), got null"
        )

    train_corpus = corpus_from_config(_spec(data.train), data.source_lang, data.target_lang)
    say(f"train corpus: {train_corpus.report()}", flush=True)
    if devices > 1:
        say(
            f"data parallel: {devices} devices in {group.num_processes} process(es); "
            f"data.batch_tokens={data.batch_tokens} is the global batch",
            flush=True,
        )
    if chief:
        _prepare_vocab(run_config, model_dir, train_corpus)
    distributed.barrier("vocabulary", group)
    vocab_path = model_dir / layout.VOCAB
    if not vocab_path.is_file():
        raise ConfigError(
            f"process {group.process_id} cannot read {vocab_path}, written by process 0: "
            "train.model_dir must be on a filesystem that every process shares"
        )
    tokenizer = SubwordTokenizer(vocab_path)
    config = run_config.transformer_config(vocab_size=tokenizer.vocab_size)
    try:
        # Special ids and sizes: decoding stops at the config's eos_id, not the vocabulary's.
        check_vocabulary(config, tokenizer, "the run config's model")
    except ValueError as error:
        raise ConfigError(str(error)) from error
    _check_same_model(model_dir / layout.TRANSFORMER_CONFIG, config)
    done = _completed(model_dir, run_config)
    if done is not None:
        say(
            f"run already complete at step {done['steps']} ({done['reason']}; max_steps "
            f"{opts.max_steps}, max_minutes {opts.max_minutes}); nothing to do",
            flush=True,
        )
        print(json.dumps(done), flush=True)
        return done
    # Every process has read the marker before process 0 removes it.
    distributed.barrier("checked-complete", group)
    if chief:
        # A later budget continues a finished run; it is complete again only when it ends.
        (model_dir / layout.COMPLETE).unlink(missing_ok=True)
        config.to_json(model_dir / layout.TRANSFORMER_CONFIG)
        run_config.decode.to_json(model_dir / layout.DECODE_SETTINGS)
        dump_run_config(run_config, model_dir / layout.RUN_CONFIG)

    # `mirrored` is tf.distribute's way to use every local device; JAX always does (above).
    mirrored = opts.strategy == "mirrored" and keras.config.backend() == "tensorflow"
    if opts.strategy == "mirrored" and not mirrored:
        say(
            f"train.strategy: mirrored is TensorFlow's; on {keras.config.backend()} every "
            f"device is used through DataParallel ({devices} here)",
            flush=True,
        )
    strategy = tf.distribute.MirroredStrategy() if mirrored else tf.distribute.get_strategy()
    with strategy.scope():
        model = build_transformer(config)
        token_count = compile_model(model, config, opts)

    # After compile: "auto" depends on whether the train step is XLA-compiled.
    length_multiple = resolve_length_multiple(data.length_multiple, model.jit_compile, devices)
    run_config = dataclasses.replace(
        run_config, data=dataclasses.replace(data, length_multiple=length_multiple)
    )
    data = run_config.data
    dataset = training_dataset(run_config, train_corpus, tokenizer, rows_multiple=devices)
    # Every process builds the same global batches and feeds its own rows of each.
    dataset = distributed.process_rows(dataset, group)
    if data.length_multiple is not None:
        shapes = batch_shapes(
            data.max_length, data.batch_tokens, data.length_multiple, rows_multiple=devices
        )
        say(
            f"batch shapes (rows, length): {len(shapes)} fixed: "
            + ", ".join(f"{rows}x{length}" for rows, length in shapes),
            flush=True,
        )
    else:
        say(
            "batch shapes: each batch padded to its longest pair (data.length_multiple null)",
            flush=True,
        )

    # Steps are optimizer updates; Keras' own counters (fit's steps, BackupAndRestore's
    # save_freq, TensorBoard's update_freq) count batches, k per update under accumulation.
    batches_per_step = opts.gradient_accumulation_steps
    max_seconds = None if opts.max_minutes is None else opts.max_minutes * 60
    budget = cb.TrainingBudget(
        model_dir,
        opts.max_steps,
        max_seconds,
        opts.save_every_steps,
        agree=lambda value: distributed.agree(value, group),
        writes=chief,
    )
    # Keras runs callbacks in this (insertion) order. BackupAndRestore is first: the others
    # read the restored step in on_train_begin.
    callbacks = {
        "backup": cb.Backup(
            str(model_dir / layout.BACKUP),
            save_freq=opts.save_every_steps * batches_per_step,
            writes=chief,
        ),
        "budget": budget,
    }
    if opts.cooldown_fraction:
        callbacks["cooldown"] = cb.Cooldown(
            budget,
            opts.cooldown_fraction,
            share=lambda value: distributed.from_chief(value, group),
        )
    # Every process runs every callback (the same JAX computations in the same order, see
    # training.distributed.save_weights); only process 0 keeps what they write.
    callbacks["progress"] = cb.ProgressLogger(
        opts.log_every_steps,
        opts.max_steps,
        max_seconds,
        budget.elapsed_before,
        progress_path=model_dir / layout.PROGRESS,
        writes=chief,
    )
    callbacks["checkpoints"] = cb.StepCheckpoints(
        model_dir, opts.save_every_steps, keep=opts.keep_checkpoints, writes=chief
    )
    callbacks["tensorboard"] = keras.callbacks.TensorBoard(
        distributed.scratch_dir(model_dir / layout.LOGS, chief),
        update_freq=opts.log_every_steps * batches_per_step,
    )
    if run_config.dev_evaluation:
        dev = corpus_from_config(_spec(data.dev), data.source_lang, data.target_lang)
        say(f"dev corpus: {dev.report()}", flush=True)
        # Greedy, so evaluation stays cheap; the rest (extra_length, ...) as the run decodes.
        # nbest is reset: a decode.nbest above 1 does not fit one beam.
        settings = dataclasses.replace(
            run_config.decode, beam_size=1, nbest=None, batch_size=opts.eval_batch_size
        )
        callbacks["dev_bleu"] = cb.BleuEvaluator(
            model_dir,
            lambda trained: _greedy_translator(trained, tokenizer, settings, data.length_multiple),
            dev.sources[: opts.eval_sentences],
            dev.targets[: opts.eval_sentences],
            every_steps=opts.eval_every_steps,
            patience=opts.early_stopping_patience,
            # Every process decodes (the weights live on all devices); process 0 writes.
            writes=chief,
            agree=lambda value: distributed.agree(value, group),
        )

    try:
        model.fit(
            dataset,
            epochs=math.ceil(opts.max_steps / opts.steps_per_epoch),
            steps_per_epoch=opts.steps_per_epoch * batches_per_step,
            callbacks=list(callbacks.values()),
            shuffle=False,  # The dataset shuffles itself; True only makes Keras warn.
            verbose=0,
        )
    except cb.RunComplete as complete:
        # Killed after its last backup but before it was marked complete: the restored state
        # is the finished one, so it is only saved and marked below.
        say(f"resumed at step {complete.step}: {complete.reason} already reached", flush=True)
    step = int(model.optimizer.iterations.numpy())
    distributed.save_weights(model, model_dir / layout.FINAL, writes=chief)
    if step % opts.save_every_steps:
        callbacks["checkpoints"].save(step)
    early = "dev_bleu" in callbacks and callbacks["dev_bleu"].stopped_early
    # Shapes the train step was traced with in this process: one compiled program each on
    # JAX. Keras' symbolic build and TensorFlow's relaxed retracing add shapes with None.
    traced = sorted(token_count.traced_shapes, key=str)
    say(f"train step traced for {len(traced)} label shapes: {traced}", flush=True)
    summary = {
        "model_dir": str(model_dir),
        "backend": keras.config.backend(),
        "steps": step,
        "reason": "early_stopping" if early else budget.reason,
        "train_seconds": round(budget.elapsed(), 1),
        "parameters": model.count_params(),
        "vocab_size": tokenizer.vocab_size,
        "traced_batch_shapes": len(traced),
        "precision": precision or "float32",
        "devices": devices,
        "processes": group.num_processes,
    }
    if chief:
        # Last, after final.weights.h5 and the last step checkpoint: its presence means finished.
        (model_dir / layout.COMPLETE).write_text(json.dumps(summary) + "\n")
    if group.multi_process:
        # Printed by every process: equal digests show the replicas hold the same weights.
        summary = dict(summary, process_id=group.process_id)
        summary["weights_digest"] = distributed.weights_digest(model)
    # Every process leaves together: process 0 must not shut down the coordination service
    # while the others still write their summary.
    distributed.barrier("finished", group)
    print(json.dumps(summary), flush=True)
    return summary


def _greedy_translator(model, tokenizer, settings, length_multiple):
    """The dev-BLEU decoder: `Translator` (tf.function) on TensorFlow; on JAX its subclass
    with a `jax.jit` search, padded like the training batches to bound recompilation."""
    import keras

    if keras.config.backend() == "jax":
        from keras_transformer.translation.jax_translator import JaxGreedyTranslator

        return JaxGreedyTranslator(model, tokenizer, settings, length_multiple=length_multiple or 8)
    from keras_transformer.translation.translator import Translator

    return Translator(model, tokenizer, settings)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__)
    parser.add_argument(
        "--config", action="append", required=True, help="YAML file; later files override"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override"
    )
    group_args = parser.add_argument_group(
        "several processes (JAX backend; one process per host, each using all its devices)"
    )
    group_args.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help=f"process 0's address, the same in every process (or ${distributed.ENV_COORDINATOR})",
    )
    group_args.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help=f"processes in the job (or ${distributed.ENV_NUM_PROCESSES})",
    )
    group_args.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=100,
        metavar="SECONDS",
        help="a process silent this long is dead and the others stop (JAX's default: 100)",
    )
    group_args.add_argument(
        "--process-id",
        type=int,
        metavar="I",
        help="this process' index, 0..N-1; 0 writes the model dir "
        f"(or ${distributed.ENV_PROCESS_ID})",
    )
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    try:
        group = distributed.process_group(
            args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout
        )
        run_config = load_run_config(args.config, args.set)
        train(run_config, group)
    except (ConfigError, CorpusError, FileNotFoundError, distributed.DistributedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
