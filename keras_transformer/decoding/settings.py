"""`DecodeSettings`: how a run translates, in one place, stored with the run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from keras_transformer.config import check_known_fields


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """The decoding of one run: written into the model directory, the defaults of `evaluate`,
    `translate`, the dev-BLEU callback and the export.

    Attributes:
        beam_size: 1 for greedy search, else beam search with this many beams (the paper: 4).
        length_penalty_alpha: `alpha` of the GNMT length penalty of beam search (the paper: 0.6).
        extra_length: an output may be this many tokens longer than its source (the paper: 50).
        batch_size: sentences per decoding batch when translating a list.
        nbest: hypotheses the n-best outputs return, at most `beam_size`; `None` means
            `beam_size`.
    """

    beam_size: int = 4
    length_penalty_alpha: float = 0.6
    extra_length: int = 50
    batch_size: int = 64
    nbest: int | None = None

    def __post_init__(self):
        problems = []
        for name in ("beam_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if (
            isinstance(self.extra_length, bool)
            or not isinstance(self.extra_length, int)
            or self.extra_length < 0
        ):
            problems.append(
                f"extra_length must be a non-negative integer, got {self.extra_length!r}"
            )
        alpha = self.length_penalty_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
            problems.append(f"length_penalty_alpha must be a non-negative number, got {alpha!r}")
        if self.nbest is not None and (
            isinstance(self.nbest, bool)
            or not isinstance(self.nbest, int)
            or not 1 <= self.nbest <= max(int(self.beam_size), 1)
        ):
            problems.append(f"nbest must be in [1, beam_size={self.beam_size}], got {self.nbest!r}")
        if problems:
            raise ValueError("Invalid DecodeSettings: " + "; ".join(problems))

    @property
    def resolved_nbest(self) -> int:
        return self.nbest or self.beam_size

    def replace(self, **changes: Any) -> DecodeSettings:
        """A copy with the given fields changed; `None` values are ignored (unset CLI flags)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DecodeSettings:
        check_known_fields(cls, values)
        return cls(**values)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> DecodeSettings:
        return cls.from_dict(json.loads(Path(path).read_text()))
