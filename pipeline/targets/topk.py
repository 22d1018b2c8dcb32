"""Top-k logits: what a store keeps of a view's full logits (`topk_arrays`), the full logits rebuilt
from it (`dense_logits`), and what keeps stored top-k rows from being rebuilt (`topk_problem`).
"""

from __future__ import annotations

import numpy as np

from pipeline.targets.spec import TOPK_INDEX, TOPK_TAIL, TOPK_TARGET, TOPK_TARGET_CLASS


def topk_arrays(logits: np.ndarray, k: int, target_classes: np.ndarray) -> dict[str, np.ndarray]:
    """What a store keeps of full logits (..., C) with top-k storage: the k largest (`logits`, as
    float32) and their classes, the logits at each view's target classes (..., 2), and the
    log-sum-exp and sum, at temperature 1, of the logits at every other class (the tail)."""
    z = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(target_classes, dtype=np.int64)
    classes = np.argsort(-z, axis=-1, kind="stable")[..., :k]  # ties: the lower class first
    tail = np.ones(z.shape, bool)
    np.put_along_axis(tail, classes, False, axis=-1)
    np.put_along_axis(tail, targets, False, axis=-1)
    top = np.where(tail, z, -np.inf).max(-1, keepdims=True)
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):  # an empty tail: log-sum-exp -inf, sum 0
        lse = np.log(np.where(tail, np.exp(z - shift), 0.0).sum(-1)) + shift[..., 0]
    return {
        "logits": np.take_along_axis(z, classes, -1).astype(np.float32),
        TOPK_INDEX: classes.astype(np.int32),
        TOPK_TARGET_CLASS: targets.astype(np.int32),
        TOPK_TARGET: np.take_along_axis(z, targets, -1).astype(np.float32),
        TOPK_TAIL: np.stack([lse, np.where(tail, z, 0.0).sum(-1)], -1).astype(np.float32),
    }


def dense_logits(values: np.ndarray, indices: np.ndarray, num_classes: int, target_classes: np.ndarray,
                 target_logits: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """Full logits (..., num_classes) float32, rebuilt from what `topk_arrays` kept.

    The top-k `values` go to their `indices`, the target logits to their `target_classes` (over a
    top-k value: they are float32, the top k may be float16). The m tail classes -- all others --
    get values whose log-sum-exp and sum at temperature 1 are the stored ones, capped at the
    k-th logit c as the true tail is: floor(j) classes at c, one between, the rest at one low value
    l, with j and l solving  j e^c + (m - j) e^l = e^LSE,  j c + (m - j) l = SUM  (then made exact
    for the whole classes). The classes that get c are a contiguous run, in class order, from a
    start drawn from the view's tail statistics.

    Exact, whatever the target: the log-sum-exp of the whole row and the logit at each target
    class, hence CE(z_t, y) for a hard label; the sum of the row, hence CE against a label-smoothed
    target and any mix of two (mixup, cutmix) of the view's target classes. The top-k logits
    themselves (to the store's dtype). Approximate: the softened distribution at tau != 1. The
    tail's mass at tau > 1 is that of the tail gathered as close under c as its log-sum-exp
    allows, a lower bound (close for a confident teacher, whose tail mass sits in a few runners-up
    just below c; short for a flat tail), and that mass sits on other classes than the true
    runners-up. The float16 top k (extract.logits_dtype) rounds the exact quantities by up to
    ~0.008 at logits ~20. On a confident 1000-class teacher at tau = 2 (README, "Top-k logits")
    the KD and WSLD losses stay within 2.3 % of the full logits' at k = 5 and 0.25 % at k >= 10,
    their gradients within 0.2 % at k >= 10; at k = 5 the gradient stays off by the softened
    probability of the runners-up left out (12-50 %), which no statistic of the tail can place.
    The constant fill of store format 4 (every tail class 100 below c) dropped the tail: CE(z_t, y)
    wrong for a label outside the top k or a smoothed target, WSLD off by 7-87 %.
    """
    values = np.asarray(values, dtype=np.float64)
    indices, targets = np.asarray(indices, dtype=np.int64), np.asarray(target_classes, dtype=np.int64)
    lse, total = (np.asarray(tail, dtype=np.float64)[..., i] for i in (0, 1))
    known = np.zeros(values.shape[:-1] + (num_classes,), bool)
    np.put_along_axis(known, indices, True, axis=-1)
    np.put_along_axis(known, targets, True, axis=-1)
    m = num_classes - known.sum(-1)
    has = m > 0
    mm = np.maximum(m, 1).astype(np.float64)
    lse, total = np.where(has, lse, 0.0), np.where(has, total, 0.0)
    cap = np.maximum(values.min(-1), lse - np.log(mm) + 1e-9)  # the k-th logit (raised if rounding left no room)
    scaled = np.exp(lse - cap)  # e^(LSE - c): the tail's mass in classes at c, <= m
    # j in [0, m): f(j) = j + (m - j) e^(l(j) - c) - e^(LSE - c), l(j) = (SUM - j c) / (m - j), rises
    # from <= 0 (Jensen) to m - e^(LSE - c) >= 0.
    lo, hi = np.zeros_like(mm), mm.copy()
    for _ in range(64):
        j = (lo + hi) / 2
        gap = np.maximum(mm - j, 1e-300)
        low = np.minimum((total - j * cap) / gap - cap, 0.0)
        above = j + gap * np.exp(low) > scaled
        hi, lo = np.where(above, j, hi), np.where(above, lo, j)
    j = (lo + hi) / 2
    whole = np.minimum(np.floor(j), mm - 1)
    rest = mm - whole - 1  # classes at l
    low = np.minimum((total - j * cap) / np.maximum(mm - j, 1e-300) - cap, 0.0)  # l - c
    frac = j - whole
    mid = np.log(np.maximum(frac + (1 - frac) * np.exp(low), 1e-300))  # u - c, the class between
    for _ in range(8):  # whole classes: make sum and log-sum-exp exact (l moves little, spread over `rest`)
        low = np.where(rest > 0, (total - whole * cap - (mid + cap)) / np.maximum(rest, 1) - cap, low)
        mid = np.log(np.maximum(scaled - whole - rest * np.exp(low), 1e-300))
    # The tail classes in class order from a start drawn from the view's statistics: rank 0, 1, ...
    bits = np.ascontiguousarray(np.asarray(tail, dtype=np.float32)[..., 0]).view(np.uint32).astype(np.uint64)
    start = ((bits * np.uint64(2654435761) % np.uint64(2**32) >> np.uint64(7)) % np.uint64(num_classes))
    start = start.astype(np.int64)[..., None]
    order = (np.arange(num_classes) + start) % num_classes  # rotated class order
    rank_rotated = np.cumsum(~np.take_along_axis(known, order, -1), -1) - 1
    rank = np.take_along_axis(rank_rotated, (np.arange(num_classes) - start) % num_classes, -1)
    fill = np.where(rank < whole[..., None], 0.0, np.where(rank == whole[..., None], mid[..., None], low[..., None]))
    dense = fill + cap[..., None]
    np.put_along_axis(dense, indices, values, axis=-1)
    np.put_along_axis(dense, targets, np.asarray(target_logits, dtype=np.float64), axis=-1)
    return dense.astype(np.float32)


def topk_problem(rows: dict[str, np.ndarray], num_classes: int) -> str | None:
    """What keeps top-k rows from being rebuilt into dense logits, or None."""
    for name in (TOPK_INDEX, TOPK_TARGET_CLASS):
        values = rows[name]
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            return f"{name} outside [0, {num_classes})"
    for name in ("logits", TOPK_TARGET, TOPK_TAIL):
        if not np.isfinite(rows[name] if name != TOPK_TAIL else rows[name][..., 1]).all():
            return f"non-finite {name}"
    if np.isnan(rows[TOPK_TAIL][..., 0]).any() or np.isposinf(rows[TOPK_TAIL][..., 0]).any():
        return f"non-finite {TOPK_TAIL}"
    return None
