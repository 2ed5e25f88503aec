"""`python -m training.train --config FILE.yaml [--set key=value ...]`: train with `model.fit`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from keras_transformer.translation import model_dir as layout
from training.corpus import CorpusError
from training.run_config import (
    ConfigError,
    dump_run_config,
    load_run_config,
    transformer_config,
)


def _spec(corpus) -> dict:
    """A corpus entry of the config: a spec string or a `{"spec": ..., options}` block."""
    return {"spec": corpus} if isinstance(corpus, str) else dict(corpus)


def _prepare_vocab(run_config, model_dir: Path, train_corpus):
    """The run's SentencePiece model, in the model dir: copied from data.vocab or trained."""
    from training.vocab import train_vocab

    target = model_dir / layout.VOCAB
    data = run_config["data"]
    if target.is_file():
        return target
    if data["vocab"]:
        source = Path(data["vocab"])
        if not source.is_file():
            raise ConfigError(f"data.vocab {source} does not exist")
        target.write_bytes(source.read_bytes())
        return target
    print(
        f"training a {data['vocab_size']}-piece {data['vocab_model_type']} vocabulary", flush=True
    )
    train_vocab(
        train_corpus,
        str(target.with_suffix("")),
        vocab_size=data["vocab_size"],
        model_type=data["vocab_model_type"],
        sample_size=data["vocab_sample_size"],
        seed=run_config["train"]["seed"],
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


def train(run_config: dict) -> dict:
    import keras
    import tensorflow as tf

    from keras_transformer import (
        MaskedLabelSmoothingLoss,
        MaskedTokenAccuracy,
        build_transformer,
        transformer_optimizer,
    )
    from keras_transformer.translation.tokenizer import SubwordTokenizer
    from training import callbacks as cb
    from training.corpus import corpus_from_config
    from training.pipeline import make_dataset

    data, opts = run_config["data"], run_config["train"]
    model_dir = Path(opts["model_dir"])
    model_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(opts["seed"])
    if opts["mixed_precision"]:
        keras.mixed_precision.set_global_policy(opts["mixed_precision"])

    train_corpus = corpus_from_config(
        _spec(data["train"]), data["source_lang"], data["target_lang"]
    )
    print(f"train corpus: {train_corpus.report()}", flush=True)
    tokenizer = SubwordTokenizer(_prepare_vocab(run_config, model_dir, train_corpus))
    config = transformer_config(run_config, vocab_size=tokenizer.vocab_size)
    _check_same_model(model_dir / layout.TRANSFORMER_CONFIG, config)
    config.to_json(model_dir / layout.TRANSFORMER_CONFIG)
    dump_run_config(run_config, model_dir / layout.RUN_CONFIG)

    max_length = min(int(data["max_length"]), config.max_length)
    dataset = make_dataset(
        train_corpus,
        tokenizer,
        batch_tokens=int(data["batch_tokens"]),
        max_length=max_length,
        shuffle=True,
        shuffle_buffer=int(data["shuffle_buffer"]),
        repeat=True,
        seed=opts["seed"],
        cache=data["cache"],
    )

    strategy = (
        tf.distribute.MirroredStrategy()
        if opts["strategy"] == "mirrored"
        else tf.distribute.get_strategy()
    )
    with strategy.scope():
        model = build_transformer(config)
        optimizer = transformer_optimizer(
            config.d_model,
            warmup_steps=int(opts["warmup_steps"]),
            scale=float(opts["learning_rate_scale"]),
            gradient_accumulation_steps=(
                int(opts["gradient_accumulation_steps"])
                if int(opts["gradient_accumulation_steps"]) > 1
                else None
            ),
        )
        model.compile(
            optimizer=optimizer,
            loss=MaskedLabelSmoothingLoss(config.label_smoothing, pad_id=config.pad_id),
            metrics=[MaskedTokenAccuracy(pad_id=config.pad_id), cb.TokenCount(config.pad_id)],
            jit_compile=opts["jit_compile"],
        )

    save_every = int(opts["save_every_steps"])
    max_steps = int(opts["max_steps"])
    max_seconds = None if opts["max_minutes"] is None else float(opts["max_minutes"]) * 60
    budget = cb.TrainingBudget(model_dir, max_steps, max_seconds, save_every)
    callbacks = [
        # First: later callbacks read the restored step in on_train_begin.
        keras.callbacks.BackupAndRestore(
            str(model_dir / layout.BACKUP),
            save_freq=save_every,
            double_checkpoint=True,
            delete_checkpoint=False,
        ),
        budget,
        cb.ProgressLogger(opts["log_every_steps"], max_steps, max_seconds, budget.elapsed_before),
        cb.StepCheckpoints(model_dir, save_every, keep=int(opts["keep_checkpoints"])),
        keras.callbacks.TensorBoard(
            str(model_dir / layout.LOGS), update_freq=int(opts["log_every_steps"])
        ),
    ]
    if data["dev"] and int(opts["eval_sentences"]) > 0:
        from keras_transformer.translation.translator import Translator

        dev = corpus_from_config(_spec(data["dev"]), data["source_lang"], data["target_lang"])
        count = int(opts["eval_sentences"])
        callbacks.append(
            cb.BleuEvaluator(
                model_dir,
                lambda m: Translator(
                    m, tokenizer, beam_size=1, batch_size=int(opts["eval_batch_size"])
                ),
                dev.sources[:count],
                dev.targets[:count],
                every_steps=int(opts["eval_every_steps"]),
                patience=opts["early_stopping_patience"],
            )
        )

    steps_per_epoch = int(opts["steps_per_epoch"])
    model.fit(
        dataset,
        epochs=math.ceil(max_steps / steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        callbacks=callbacks,
        verbose=0,
    )
    step = int(model.optimizer.iterations.numpy())
    model.save_weights(model_dir / layout.FINAL)
    if step % save_every:
        callbacks[3].save(step)
    summary = {
        "model_dir": str(model_dir),
        "steps": step,
        "train_seconds": round(budget.elapsed(), 1),
        "parameters": model.count_params(),
        "vocab_size": tokenizer.vocab_size,
    }
    print(json.dumps(summary), flush=True)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__)
    parser.add_argument(
        "--config", action="append", required=True, help="YAML file; later files override"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override"
    )
    args = parser.parse_args(argv)
    try:
        run_config = load_run_config(args.config, args.set)
        train(run_config)
    except (ConfigError, CorpusError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
