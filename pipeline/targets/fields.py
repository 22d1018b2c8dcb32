"""The stored fields of a split, one codec each: the arrays a field holds and its `encode` (a shard's
values -> its stored arrays, used by the writer), `decode` (stored arrays -> what a reader gets) and
`check` (what `bkd cache verify` and a validating read refuse), side by side.

A new stored field is one codec here, its arrays in `TargetSpec.array_schema`, and its consumer.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.digests import pixel_digests, split_fingerprint
from pipeline.targets.codecs import CODECS, Codec
from pipeline.targets.spec import (IMAGES, LOGITS, SCALES, SOURCE_ROW, TOPK_ARRAYS, TOPK_INDEX, TOPK_TAIL, TOPK_TARGET,
                                   TOPK_TARGET_CLASS, TargetSpec, feature_array)
from pipeline.targets.topk import dense_logits, topk_arrays, topk_problem


class FieldError(Exception):
    """A field's stored arrays cannot be decoded; the message says why."""


class Field:
    """One stored field: `name` is the key its decoded values go under, `arrays` the arrays it is stored in."""

    def __init__(self, name: str):
        self.name = name
        self.arrays: tuple[str, ...] = (name,)

    def encode(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Its stored arrays, from a shard's `values` (keyed as `StoreWriter.write_shard` takes them)."""
        return {self.name: values[self.name]}

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What a reader gets from its stored arrays (`stored`: rows of every array read); raises
        FieldError when they cannot be decoded."""
        return {self.name: stored[self.name]}

    def check(self, rows: dict[str, np.ndarray], start: int, stop: int) -> str | None:
        """What is wrong with its decoded `rows` (rows [start, stop) of the split), or None."""
        return None


class Coded(Field):
    """Float targets kept by a codec (pipeline.targets.codecs): its codes under the field's name and, for
    an 8-bit codec, their scales under `scales.<target>`; read back as floats."""

    def __init__(self, name: str, target: str, codec: Codec):
        super().__init__(name)
        self.codec, self.scales = codec, SCALES + target
        self.arrays = (name, self.scales) if codec.scaled else (name,)

    def encode(self, values):
        codes, scales = self.codec.encode(values[self.name])
        return {self.name: codes, **({self.scales: scales} if self.codec.scaled else {})}

    def decode(self, stored):
        scales = stored[self.scales] if self.codec.scaled else None
        if scales is not None and not (np.isfinite(scales).all() and (scales > 0).all()):
            raise FieldError(f"{self.scales} holds scales that are not positive and finite")
        return {self.name: self.codec.decode(stored[self.name], scales)}


class Features(Coded):
    """The teacher's features at one location: (N, V, C) vectors or (N, V, C, H, W) maps."""

    def __init__(self, location: str, codec: Codec = CODECS["float16"]):
        super().__init__(feature_array(location), location, codec)
        self.location = location

    def check(self, rows, start, stop):
        if not np.isfinite(rows[self.name]).all():
            return f"non-finite teacher features ({self.name})"
        return None


class Logits(Coded):
    """The teacher's full logits (N, V, C)."""

    def __init__(self, codec: Codec = CODECS["float16"]):
        super().__init__(LOGITS, LOGITS, codec)

    def check(self, rows, start, stop):
        return None if np.isfinite(rows["logits"]).all() else "non-finite logits"


class TopKLogits(Logits):
    """The teacher's logits kept as the k largest (`logits`) with their classes, each view's target classes,
    the logits there and the tail's statistics (`TOPK_ARRAYS`); read back as full logits (N, V, C)."""

    def __init__(self, k: int, num_classes: int, codec: Codec = CODECS["float16"]):
        super().__init__(codec)
        self.k, self.num_classes = k, num_classes
        self.arrays = self.arrays + TOPK_ARRAYS  # the codec keeps the k largest; the rest stays float32

    def encode(self, values):
        """From full logits and the views' target classes (`TOPK_TARGET_CLASS`, (N, V, 2)); values already
        in top-k form (`TOPK_INDEX` given) are stored as they are."""
        arrays = (values if TOPK_INDEX in values else topk_arrays(values[LOGITS], self.k, values[TOPK_TARGET_CLASS]))
        return {**{name: arrays[name] for name in TOPK_ARRAYS}, **super().encode(arrays)}

    def decode(self, stored):
        rows = {**stored, **super().decode(stored)}
        problem = topk_problem(rows, self.num_classes)
        if problem:
            raise FieldError(problem)
        return {LOGITS: dense_logits(rows[LOGITS], rows[TOPK_INDEX], self.num_classes,
                                     rows[TOPK_TARGET_CLASS], rows[TOPK_TARGET], rows[TOPK_TAIL])}


class Labels(Field):
    """Each sample's class (N,)."""

    def __init__(self, num_classes: int):
        super().__init__("labels")
        self.num_classes = num_classes

    def check(self, rows, start, stop):
        labels = rows["labels"]
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            return f"labels outside [0, {self.num_classes})"
        return None


class Index(Field):
    """Each row's position in the split (N,): rows [start, stop) hold start, ..., stop - 1."""

    def __init__(self):
        super().__init__("index")

    def check(self, rows, start, stop):
        return None if np.array_equal(rows["index"], np.arange(start, stop)) else "sample index out of order"


IMAGE_BLOCK = 16  # rows per stored chunk of the images array, at most


class Images(Field):
    """Each sample's raw source pixels (N, *source_shape) uint8, tied to the samples by `pixel_digest`."""

    def __init__(self):
        super().__init__(IMAGES)

    @staticmethod
    def mismatches(raw: np.ndarray, digests: np.ndarray) -> np.ndarray:
        """The positions of the samples of `raw` whose pixels are not those of `digests` (the stored pixel_digest)."""
        return np.flatnonzero(pixel_digests(raw) != digests)

    def check(self, rows, start, stop):
        if "pixel_digest" not in rows:
            return None
        bad = self.mismatches(rows[IMAGES], rows["pixel_digest"])
        return f"the stored image of row {start + int(bad[0])} does not match its pixel digest" if len(bad) else None


    @staticmethod
    def block_rows(chunk_size: int) -> int:
        """Rows per stored chunk of the images array: a few (a mix partner decodes its block), dividing the
        chunk size (so shards hold whole blocks)."""
        return math.gcd(IMAGE_BLOCK, chunk_size)


class SourceRows(Field):
    """Each row's sample id (N,): the row of the dataset's files it was read from (the split's `ids`)."""

    def __init__(self):
        super().__init__(SOURCE_ROW)

    def check(self, rows, start, stop):
        return "negative sample ids (source_row)" if len(rows[SOURCE_ROW]) and rows[SOURCE_ROW].min() < 0 else None


def sample_ids_problem(ids: np.ndarray, labels: np.ndarray, fingerprint: str) -> str | None:
    """What is wrong with a whole split's stored sample ids and labels, or None: each id once and, with the
    labels, the split the manifest's `fingerprint` records (what a run without the dataset's files relies on)."""
    if len(ids) and ids.min() < 0:
        return f"{SOURCE_ROW} holds negative sample ids"
    if len(np.unique(ids)) != len(ids):
        return f"{SOURCE_ROW} holds repeated sample ids"
    if split_fingerprint(ids, labels) != fingerprint:
        return "the sample ids and labels are not the ones the manifest's fingerprint records"
    return None


def store_fields(spec: TargetSpec) -> tuple[Field, ...]:
    """The codecs of every stored field of a store, in the order readers get them."""
    codec = {target: CODECS[spec.codec(target)] for target in (*spec.feature_shapes, LOGITS)}
    logits = (TopKLogits(spec.logits_topk, spec.num_classes, codec[LOGITS]) if spec.logits_topk
              else Logits(codec[LOGITS]))
    return (*(Features(loc, codec[loc]) for loc in spec.feature_shapes), logits, Field("view_params"), Labels(spec.num_classes),
            Index(), Field("pixel_digest"), *((Images(),) if spec.image_shape else ()),
            *((SourceRows(),) if spec.source_rows else ()))
