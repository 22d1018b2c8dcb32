"""The teacher-target contract, in one place: the spec of a store (`spec`), what a config expects of it
(`identity`), and the sharded Zarr store that holds it -- one codec per stored field (`fields`, with the
top-k maths in `topk`), the writer (`writer`), the reader (`reader`), the stored images (`images`),
opening and digests (`manifest`), paths and owned deletion (`fsutil`), info and verify (`verify`), and the
small identity file that names a complete store (`identity_file`).
Stage one writes through it, stage two reads through it; neither imports the other, and it imports no
data-loading or augmentation code.
"""

from pipeline.targets.fields import (Features, Field, FieldError, Images, Index, Labels, Logits, TopKLogits,
                                     pixel_digests, store_fields)
from pipeline.targets.fsutil import (bytes_on_disk, check_store_location, existing_store, filesystem,
                                     remove_store)
from pipeline.targets.identity import (PIXEL_CHECK_SAMPLES, check_student_targets, expected_spec,
                                       student_teacher_sha, teacher_sha)
from pipeline.targets.identity_file import check_identity, check_identity_target, read_identity, write_identity
from pipeline.targets.images import StoredImages
from pipeline.targets.manifest import check_format
from pipeline.targets.reader import TeacherTargets
from pipeline.targets.spec import (FORMAT, IMAGES, SOURCE_ROW, TOPK_ARRAYS, TOPK_INDEX, TOPK_TAIL, TOPK_TARGET,
                                   TOPK_TARGET_CLASS, SplitLayout, TargetSpec, feature_array)
from pipeline.targets.topk import dense_logits, topk_arrays
from pipeline.targets.verify import store_info, verify_store
from pipeline.targets.writer import StoreWriter

__all__ = ["FORMAT", "IMAGES", "PIXEL_CHECK_SAMPLES", "SOURCE_ROW", "TOPK_ARRAYS", "TOPK_INDEX", "TOPK_TAIL",
           "TOPK_TARGET", "TOPK_TARGET_CLASS", "Features", "Field", "FieldError", "Images", "Index", "Labels", "Logits",
           "SplitLayout", "StoreWriter", "StoredImages", "TargetSpec", "TeacherTargets", "TopKLogits",
           "bytes_on_disk", "check_format", "check_identity", "check_identity_target", "check_store_location",
           "check_student_targets", "dense_logits",
           "existing_store", "expected_spec", "feature_array", "filesystem", "pixel_digests", "read_identity", "remove_store",
           "store_fields", "store_info", "student_teacher_sha", "teacher_sha", "topk_arrays", "verify_store",
           "write_identity"]
