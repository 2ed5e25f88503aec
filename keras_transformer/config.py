"""`TransformerConfig`: every hyper-parameter of one model, named presets, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

NORM_PLACEMENTS = ("post", "pre")

# The special ids of every vocabulary this project trains (`training.vocab`) and every model it
# builds: the one place they are defined. A SentencePiece model with other ids, or a config
# that disagrees with its vocabulary, is refused where the two meet.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def check_known_fields(cls, values: dict[str, Any]) -> None:
    """Refuses keys of `values` that are not fields of the dataclass `cls`, naming them."""
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"Unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}"
        )


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of an encoder-decoder Transformer (Vaswani et al., 2017).

    One object describes a model completely: it is written next to every checkpoint and export so
    that any artifact can be rebuilt without guessing.

    Attributes:
        vocab_size: size of the (shared) vocabulary; with `share_embeddings=False` the source
            vocabulary size.
        target_vocab_size: target vocabulary size when embeddings are not shared; `None` means
            `vocab_size`.
        d_model: model width (`d_model` in the paper).
        num_heads: attention heads (`h`); must divide `d_model`.
        ffn_dim: inner size of the position-wise feed-forward network (`d_ff`).
        num_encoder_layers: encoder layers (`N`).
        num_decoder_layers: decoder layers (`N`).
        dropout: residual, embedding and feed-forward dropout (`P_drop`).
        attention_dropout: dropout on attention weights (the paper's base model uses 0).
        label_smoothing: label smoothing of the training loss (`epsilon_ls`).
        max_length: longest sequence (source or target, in tokens, special tokens included)
            the positional encoding and the decoding caches are sized for.
        norm_placement: `"post"` (the paper: `LayerNorm(x + Sublayer(x))`) or `"pre"`
            (`x + Sublayer(LayerNorm(x))`, with a final layer norm after each stack).
        share_embeddings: tie source embedding, target embedding and pre-softmax projection
            (paper §3.4). Requires one shared vocabulary.
        layer_norm_epsilon: epsilon of every layer norm.
        pad_id: padding id, masked everywhere (0).
        bos_id: start-of-sentence id fed as the first decoder input (2).
        eos_id: end-of-sentence id that ends a hypothesis (3).
    """

    vocab_size: int = 32000
    target_vocab_size: int | None = None
    d_model: int = 512
    num_heads: int = 8
    ffn_dim: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dropout: float = 0.1
    attention_dropout: float = 0.0
    label_smoothing: float = 0.1
    max_length: int = 256
    norm_placement: str = "post"
    share_embeddings: bool = True
    layer_norm_epsilon: float = 1e-6
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "d_model", "num_heads", "ffn_dim", "max_length"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.d_model % max(self.num_heads, 1):
            problems.append(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        for name in ("dropout", "attention_dropout", "label_smoothing"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                problems.append(f"{name} must be in [0, 1), got {value!r}")
        if self.norm_placement not in NORM_PLACEMENTS:
            problems.append(
                f"norm_placement must be one of {NORM_PLACEMENTS}, got {self.norm_placement!r}"
            )
        if (
            self.share_embeddings
            and self.target_vocab_size is not None
            and self.target_vocab_size != self.vocab_size
        ):
            problems.append(
                "share_embeddings=True needs one vocabulary, but target_vocab_size "
                f"({self.target_vocab_size}) != vocab_size ({self.vocab_size})"
            )
        ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        for name, value in ids.items():
            if not 0 <= value < min(self.vocab_size, self.resolved_target_vocab_size):
                problems.append(f"{name} ({value}) is outside the vocabulary")
        if len(set(ids.values())) != 3:
            problems.append(f"pad_id, bos_id and eos_id must differ, got {ids}")
        if problems:
            raise ValueError("Invalid TransformerConfig: " + "; ".join(problems))

    @property
    def resolved_target_vocab_size(self) -> int:
        """The target vocabulary size (equal to `vocab_size` unless set separately)."""
        return self.target_vocab_size or self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    # -- presets ---------------------------------------------------------------------------
    @classmethod
    def preset_names(cls) -> tuple[str, ...]:
        return tuple(PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TransformerConfig:
        """A named preset with fields overridden: `preset("base", vocab_size=37000)`."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> TransformerConfig:
        return dataclasses.replace(self, **changes)

    # -- serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TransformerConfig:
        check_known_fields(cls, values)
        return cls(**values)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> TransformerConfig:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))


# The paper's Table 3 rows "base" and "big"; "small" fits Multi30k (29k pairs) on a CPU and
# "tiny" keeps unit tests fast. Vocabulary sizes are the ones each is normally trained with.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=64,
        d_model=32,
        num_heads=4,
        ffn_dim=64,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dropout=0.0,
        max_length=64,
    ),
    "small": dict(
        vocab_size=8000,
        d_model=256,
        num_heads=4,
        ffn_dim=1024,
        num_encoder_layers=3,
        num_decoder_layers=3,
        dropout=0.1,
        max_length=256,
    ),
    "base": dict(
        vocab_size=32000,
        d_model=512,
        num_heads=8,
        ffn_dim=2048,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dropout=0.1,
        max_length=256,
    ),
    "big": dict(
        vocab_size=32000,
        d_model=1024,
        num_heads=16,
        ffn_dim=4096,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dropout=0.3,
        max_length=256,
    ),
}
