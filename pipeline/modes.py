"""The distillation modes: what each adds to the student's cross-entropy, as one table.

Every reader of a mode's meaning takes it from here: the criterion (pipeline.student.losses), config
validation, the CLI's --distill choices and dvc.yaml's train_student stages (tests/test_dvc_deps.py
checks its `foreach` against the table). Data only: no torch, so the config can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FeatureTerm = Literal["none", "bkd", "regression"]
LogitsTerm = Literal["none", "kd", "wsld"]


@dataclass(frozen=True)
class Mode:
    """One mode: its feature term, the pairs that term reads, and its logits term.

    features:  none | bkd (blurred: mask, generation block, regression; BKDHead) | regression (plain
               A(S) vs F_t, the KDSNN and LaSNN baselines; FeatureRegression), weighted by student.bkd.alpha
    pairs:     the StudentConfig field of {student location: teacher location} pairs it reads ("" for none)
    layerwise: one term per pair, one or more pairs; otherwise exactly one pair
    logits:    none | kd (Hinton) | wsld (weighted soft labels), weighted by student.logits.weight
    """

    features: FeatureTerm = "none"
    pairs: Literal["", "features", "lasnn_features"] = ""
    layerwise: bool = False
    logits: LogitsTerm = "none"

    @property
    def params(self) -> tuple[str, ...]:
        """The config sections (or fields) its loss reads (dvc.yaml's `uses`), in that order: a blur-ratio
        sweep re-runs only the modes with the BKD term."""
        return ((("student.bkd",) if self.features == "bkd" else ())  # lambda, alpha, rescale
                + (("student.bkd.alpha",) if self.features == "regression" else ())  # the weight alone
                + (("student.logits",) if self.logits != "none" else ())
                + ((f"student.{self.pairs}",) if self.pairs else ()))


MODES: dict[str, Mode] = {
    "none": Mode(),
    "kd": Mode(logits="kd"),
    "wsld": Mode(logits="wsld"),
    "bkd": Mode("bkd", "features"),
    "mixed": Mode("bkd", "features", logits="wsld"),  # the paper's best
    "kdsnn": Mode("regression", "features"),
    "lasnn": Mode("regression", "lasnn_features", layerwise=True),
}
DISTILL_MODES = tuple(MODES)
