"""The teacher-target contract: one frozen description of a store, built once.

A `TargetSpec` says everything a store holds and everything that identifies it: the teacher
(timm name, checkpoint sha256, stem, classes, features), what was cached (`features`: the
teacher's feature locations -- pooled pre-logits, its last map, named stages -- with their
shapes, one array each, and top-k logits), the dataset and each split (size, fingerprint
of ids and labels, K views), the input transform and the view-making augmentation, dtypes and
chunking. The writer is made from a spec, the reader exposes the spec it opened, the manifest
is its serialisation, and `first_difference` is the one comparison, naming the first field
that differs. The arrays a store holds are defined here (`array_schema`) and nowhere else.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from pipeline.errors import short
from pipeline.targets.codecs import get_codec

FORMAT = "bkd-teacher-targets/10"
FORMAT_FAMILY = FORMAT.split("/")[0]
# format 10 stores, beside the images (extract.images), each row's sample id (`source_row`), so a split can be
# rebuilt and checked from the store alone; a format-9 store is a format-10 store without it.
# Format 9 writes a digest of the manifest beside it (`manifest_digest`), so a hand-edited manifest (a
# teacher hash, a fingerprint, a view count) is refused; a format-8 store is a format-9 store without it.
# Format 8 records a codec per feature location and for the logits (`codecs`); a format-7 store is a
# format-8 store whose codecs are its dtypes. Readers take both as they are (extraction resumes neither).
READABLE_FORMATS = (FORMAT, *(f"{FORMAT_FAMILY}/{n}" for n in (9, 8, 7)))
DIGEST_SINCE = 9  # format 9: the manifest's digest beside it
ROWS_SHUFFLED_SINCE = 6  # format 6: rows in the split's seeded random order (data.split_seed), not the files'
VIEW_LAYOUT_SINCE = 7  # format 7: augment.view_layout names the slices of each view's parameter vector
SPLITS = ("train", "test")
TOPK_INDEX = "logits_index"  # with top-k logits: `logits` holds the k largest, this their classes
# ... and, per view, what the losses need of the logits left out (see store.dense_logits):
TOPK_TARGET_CLASS = "logits_target_class"  # (N, V, 2) int32: the classes the view's training target is made of
TOPK_TARGET = "logits_target"  # (N, V, 2) float32: the teacher's logits at those classes
TOPK_TAIL = "logits_tail"  # (N, V, 2) float32: log-sum-exp and sum of the logits at every other class
TOPK_ARRAYS = (TOPK_INDEX, TOPK_TARGET_CLASS, TOPK_TARGET, TOPK_TAIL)  # in this order in `row_arrays`
# Written by the store itself: a 64-bit digest of every chunk's rows in every array, so a chunk
# moved, swapped or rewritten behind bkd's back reads as an error instead of another row's targets.
# One column per row array (in `row_arrays` order), so a reader of some of the arrays checks just those.
CHUNK_DIGEST = "chunk_digest"
FLAGS = "shards_done"
FEATURES = "features."  # the array of teacher feature location LOC is "features.LOC"
SCALES = "scales."  # with an 8-bit codec, the scales of LOC's codes are "scales.LOC" (of the logits', "scales.logits")
LOGITS = "logits"
ROW_ARRAYS = ("logits", "view_params", "labels", "index", "pixel_digest")  # besides the feature arrays
# With extract.images: each sample's raw source pixels (N, *source_shape) uint8, one inner chunk per
# row (a mix partner is read alone), so training reads arrays instead of decoding image files.
IMAGES = "images"
# ... and each row's sample id (N,) int64: the split's `ids`, the rows of the dataset's files (format 10).
# With the labels they give the split's fingerprint, so the store alone says which samples it holds.
SOURCE_ROW = "source_row"


def manifest_digest(manifest: dict) -> str:
    """blake2b-128 of the manifest as canonical JSON: written beside it, checked by every reader."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def format_version(found: Any) -> int:
    """The number of a store format string ('bkd-teacher-targets/10' -> 10), 0 when it has none."""
    version = str(found).rsplit("/", 1)[-1]
    return int(version) if version.isdigit() else 0


def older_format(found: Any) -> str:
    """Why a store of the older format `found` cannot be read as it is: '' if nothing more than its number."""
    version = str(found).rsplit("/", 1)[-1]
    if version.isdigit() and int(version) < ROWS_SHUFFLED_SINCE:
        return (" (stores of format 5 and older hold an official split's rows in its files' order, class by "
                "class for image folders, which gives training batches of a few classes, and data.limit's "
                "first rows)")
    if version.isdigit() and int(version) < VIEW_LAYOUT_SINCE:
        return (" (stores of format 6 do not record augment.view_layout, the layout of their view parameters, "
                "so a reader cannot check it is the layout it rebuilds views from)")
    return ""


def feature_array(location: str) -> str:
    """The name of the array that holds the teacher's features at `location`."""
    return FEATURES + location


def is_row_array(name: str) -> bool:
    """Is `name` a per-row array a store may hold (the fixed ones, top-k classes, any feature location)?"""
    return (name in ROW_ARRAYS or name in TOPK_ARRAYS or name in (IMAGES, SOURCE_ROW)
            or any(name.startswith(prefix) and len(name) > len(prefix) for prefix in (FEATURES, SCALES)))

# What a training run must agree with (the rest -- views, feature locations, top-k -- it takes from
# the store), as dotted manifest paths; `splits.<split>.fingerprint` is compared per split.
STUDENT_IDENTITY = ("teacher.model", "teacher.checkpoint_sha256", "teacher.small_input_stem", "teacher.timesteps",
                    "teacher.model_kwargs", "dataset.name",
                    "dataset.split_seed", "dataset.test_size", "dataset.limit", "dataset.holdout", "transform", "augment")
# What an extraction must agree with to resume a store: all of it but the provenance.
STORE_IDENTITY = ("teacher", "dataset", "splits", "transform", "augment", "arrays", "chunking", "features", "codecs")


@dataclass(frozen=True)
class SplitLayout:
    """Rows, chunks and shards of one split: the units the reader streams and the writer writes."""

    num_samples: int
    chunk_size: int
    chunks_per_shard: int
    views: int = 1

    @property
    def shard_size(self) -> int:
        return self.chunk_size * self.chunks_per_shard

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.shard_size)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_samples / self.chunk_size)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)


@dataclass(frozen=True)
class TargetSpec:
    teacher: dict[str, Any]  # model, checkpoint_sha256, small_input_stem, num_classes, num_features, precision
    dataset: dict[str, Any]  # name, split_seed, test_size, limit, holdout
    splits: dict[str, dict[str, Any]]  # split -> num_samples, fingerprint, views
    transform: dict[str, Any]
    augment: dict[str, Any]  # the view-making spec, with its param_names
    features: dict[str, Any]  # locations ({location: shape}, in extraction order), logits_topk
    dtypes: dict[str, str] = field(default_factory=lambda: {"features": "float16", "logits": "float16"})
    # {location or "logits": codec name} (pipeline.targets.codecs); where one is absent, its dtype above
    codecs: dict[str, str] = field(default_factory=dict)
    chunking: dict[str, int] = field(default_factory=lambda: {"chunk_size": 256, "chunks_per_shard": 4})
    zstd_level: int = 3

    @property
    def num_classes(self) -> int:
        return self.teacher["num_classes"]

    @property
    def logits_topk(self) -> int | None:
        return self.features.get("logits_topk")

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        """The shape of one sample's stored source pixels, or None when the store holds no images."""
        shape = self.features.get("images")
        return tuple(shape) if shape else None

    @property
    def source_rows(self) -> bool:
        """Does the store hold each row's sample id (`source_row`, stored with the images since format 10)?"""
        return bool(self.features.get("source_rows"))

    @property
    def feature_shapes(self) -> dict[str, tuple[int, ...]]:
        """{location: (C,) or (C, H, W)} of every cached teacher feature location."""
        return {loc: tuple(shape) for loc, shape in self.features["locations"].items()}

    def codec(self, target: str) -> str:
        """The codec name of the features at location `target`, or of the logits (`target` "logits")."""
        return self.codecs.get(target) or self.dtypes[LOGITS if target == LOGITS else "features"]

    def scaled(self) -> tuple[str, ...]:
        """The targets (locations, "logits") stored as 8-bit codes with a scales array beside them."""
        return tuple(t for t in (*self.feature_shapes, LOGITS) if get_codec(self.codec(t)).scaled)

    def layout(self, split: str) -> SplitLayout:
        meta = self.splits[split]
        return SplitLayout(meta["num_samples"], self.chunking["chunk_size"], self.chunking["chunks_per_shard"],
                           meta["views"])

    def row_arrays(self) -> tuple[str, ...]:
        """The per-row arrays of every split, in the order of their chunk-digest columns."""
        features = tuple(feature_array(loc) for loc in self.feature_shapes)
        scales = tuple(SCALES + target for target in self.scaled())
        images = ((IMAGES,) if self.image_shape else ()) + ((SOURCE_ROW,) if self.source_rows else ())
        return features + ROW_ARRAYS + (TOPK_ARRAYS if self.logits_topk else ()) + images + scales

    def array_schema(self, split: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """{name: (shape, dtype)} of the per-row arrays of `split`: the one definition of a store's arrays."""
        n, views = self.splits[split]["num_samples"], self.splits[split]["views"]
        k = self.logits_topk or self.num_classes
        schema = {feature_array(loc): ((n, views, *shape), get_codec(self.codec(loc)).dtype)
                  for loc, shape in self.feature_shapes.items()}
        schema |= {
            "logits": ((n, views, k), get_codec(self.codec(LOGITS)).dtype),
            "view_params": ((n, views, len(self.augment["param_names"])), "int32"),
            "labels": ((n,), "int64"),
            "index": ((n,), "int64"),
            "pixel_digest": ((n,), "uint64"),
        }
        if self.logits_topk:  # "every other class": outside the top k and the target classes
            schema |= {TOPK_INDEX: ((n, views, k), "int32"), TOPK_TARGET_CLASS: ((n, views, 2), "int32"),
                       TOPK_TARGET: ((n, views, 2), "float32"), TOPK_TAIL: ((n, views, 2), "float32")}
        if self.image_shape:
            schema[IMAGES] = ((n, *self.image_shape), "uint8")
        if self.source_rows:
            schema[SOURCE_ROW] = ((n,), "int64")
        shapes = {**self.feature_shapes, LOGITS: (k,)}
        for target in self.scaled():
            schema[SCALES + target] = ((n, views, *get_codec(self.codec(target)).scale_shape(shapes[target])), "float32")
        return schema

    def to_manifest(self) -> dict[str, Any]:
        """The spec as the store's manifest, with the provenance (package versions, time) added."""
        any_split = next(iter(self.splits))
        return {
            "format": FORMAT,
            **dataclasses.asdict(self),
            "arrays": {name: dtype for name, (_, dtype) in self.array_schema(any_split).items()},
            "versions": package_versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "TargetSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in manifest.items() if key in names})


def get(mapping: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def first_difference(have: dict, want: dict, keys: tuple[str, ...]) -> str | None:
    """'field: X in the store, Y here' for the first of `keys` (dotted paths) that differs, or None;
    where both sides are mappings, the first differing field inside them (augment.randaugment, not
    all of augment), so the line names what to change."""
    for key in keys:
        a, b = get(have, key), get(want, key)
        while isinstance(a, dict) and isinstance(b, dict) and a != b:
            inner = next((k for k in [*a, *(k for k in b if k not in a)] if a.get(k) != b.get(k)), None)
            if inner is None:  # they differ only by a key one side lacks and the other sets to None
                break
            key, a, b = f"{key}.{inner}", a.get(inner), b.get(inner)
        if a != b and not (isinstance(a, dict) and isinstance(b, dict)):
            return f"{key}: {short(a)} in the store, {short(b)} here"
    return None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in ("torch", "timm", "zarr", "numcodecs", "numpy", "spikingjelly", "bkd"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
