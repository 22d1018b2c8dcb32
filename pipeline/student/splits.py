"""The splits a student run reads, and the store it checks them against: the dataset's files, or the
images a store holds.

A store built with `extract.images: true` holds each sample's source pixels, their digests and (format 10)
the sample ids, so it can stand in for the dataset: on a node that holds the store but not the image folder
(or where the folder cannot be read), the splits are rebuilt from the store alone -- ids and labels checked
against the manifest's fingerprints, pixels against their digests. Where the files are there too, they
give the split's identity (its ids, labels and fingerprint, as without stored images), and the run reads
the store's pixels, the ones the teacher saw: a file rewritten since extraction is reported, never trained
on. A dataset held in memory whose every sample equals the store's is read from memory (the same values).
Each run says in one line which pixels it reads.
"""

from __future__ import annotations

from tqdm import tqdm

from pipeline.augment import ViewAugmenter
from pipeline.config import Config
from pipeline.data import ImageSplit, load_splits, scattered_read_warning
from pipeline.errors import DataError, StoreError
from pipeline.targets import StoredImages, TeacherTargets, check_student_targets, student_teacher_sha
from pipeline.targets.fsutil import store_exists
from pipeline.targets.manifest import open_group

SPLITS = ("train", "test")


def dataset_files(cfg: Config) -> dict[str, ImageSplit] | DataError:
    """The train and test splits of the dataset's files, or why they cannot be read."""
    try:
        return load_splits(cfg.data, SPLITS)
    except DataError as exc:
        return exc
    except OSError as exc:  # a folder it may not list (permissions), a dead mount
        return DataError(f"{exc.strerror or type(exc).__name__}: {exc.filename}" if exc.filename else str(exc))


def student_splits(cfg: Config, trust_store_teacher: bool = False, log: bool = False,
                   files: dict[str, ImageSplit] | DataError | None = None
                   ) -> tuple[dict[str, ImageSplit], dict[str, TeacherTargets]]:
    """The train and test splits of a cached student run, each checked against its split of the store
    (`targets`: the store's train split always; its test split where the store holds one), reading the
    store's images where it holds them. `files`: `dataset_files(cfg)` when already read. `log`: print
    which pixels the run reads and any warning."""
    files = dataset_files(cfg) if files is None else files
    missing = files if isinstance(files, DataError) else None
    files = dict.fromkeys(SPLITS) if missing else files
    store = cfg.extract.store
    splits, targets, notes, sha = {}, {}, [], None
    for name in SPLITS:
        if name == "test" and not _store_has(store, name):  # extract.splits: [train]
            if files[name] is None:
                raise DataError(f"{missing} (and {store} holds no test split to read instead)")
            splits[name] = files[name]
            continue
        splits[name], targets[name], note = student_split(cfg, name, files[name], trust_store_teacher, missing, sha)
        notes.append(note)
        sha = targets[name].spec.teacher["checkpoint_sha256"]  # checked: the next split's teacher is this one
    if log:
        for line in dict.fromkeys(n for n in notes if n):  # one line for what both splits share
            tqdm.write(line)
        if missing is None and (warning := scattered_read_warning(splits["train"])):
            tqdm.write(warning)
    return splits, targets


def student_split(cfg: Config, name: str, files: ImageSplit | None, trust_store_teacher: bool = False,
                  missing: Exception | None = None, sha: str | None = None) -> tuple[ImageSplit, TeacherTargets, str]:
    """(the split `name` a run reads, the store's split, a line saying where its pixels come from or '').

    `files`: the split from the dataset's files, or None where they cannot be read (`missing`: why), which
    takes a store holding the images (else `missing` is raised). `sha`: the teacher's sha256 once another
    split of the store was checked (else from teacher.checkpoint, see `student_teacher_sha`)."""
    if files is None and not store_exists(cfg.extract.store):
        raise missing
    targets = TeacherTargets(cfg.extract.store, name)
    sha = sha or student_teacher_sha(cfg, targets, trust_store_teacher)
    stored = targets.spec.image_shape is not None
    # decoded image rows kept: a sampler window's twice over for training; evaluation reads in order
    cache_rows = 2 * cfg.student.shuffle_buffer_chunks * targets.chunk_size if name == "train" else 0
    if files is None:
        if not stored:
            raise missing
        split = ImageSplit(cfg.data.name, name, images := StoredImages(targets, None, cache_rows), images.ids, cfg.data)
        check_student_targets(targets, cfg, split, sha, _views(cfg, split))
        return split, targets, (f"data: {missing}; reading the images stored in {targets.path} instead (sample ids "
                                "and labels checked against its fingerprints)")
    if not stored:
        check_student_targets(targets, cfg, files, sha, _views(cfg, files))
        return files, targets, ""
    try:
        differing, checked = check_student_targets(targets, cfg, files, sha, _views(cfg, files), read_stored=True)
    except DataError as exc:  # a damaged file: the store holds what the teacher saw
        differing, checked, unread = None, 0, exc
    images = StoredImages(targets, files, cache_rows)  # the ids and labels it holds checked against the files'
    if differing == 0 and files.in_memory:
        return files, targets, (f"pixels: {files.source.origin or cfg.data.name}, in memory (every sample equal "
                                f"to the images stored in {targets.path})")
    split = files.reading_from(images)
    if differing is None:
        return split, targets, (f"warning: {unread}; the run reads the images stored in {targets.path}, "
                                "which the teacher saw")
    if differing:
        return split, targets, (f"warning: {differing} of {checked} checked {name} samples of "
                                f"{files.source.origin or cfg.data.name} differ from the images stored in "
                                f"{targets.path}: files rewritten since extraction, or a damaged store (`bkd cache "
                                "verify` checks it); the run reads the stored ones (re-extract to train on the files)")
    return split, targets, (f"pixels: the images stored in {targets.path}, decoded once at extraction (the files "
                            "give the sample ids and labels)")


def _store_has(store: str, name: str) -> bool:
    """Does the store (whatever its state: opening a split checks the rest) have a split `name`?"""
    try:
        return name in open_group(store).attrs["manifest"]["splits"]
    except StoreError:
        return True  # opening the split says what is wrong


def _views(cfg: Config, split: ImageSplit) -> dict:
    return ViewAugmenter(cfg.augment, tuple(split.image_shape)).spec()

