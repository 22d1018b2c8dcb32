"""The teacher-target contract, in one place: the spec of a store (`spec`), the sharded Zarr
store that holds it (`store`: writer, reader, verify, info) and what a config expects of it
(`identity`). Stage one writes through it, stage two reads through it; neither imports the other.
"""

from pipeline.targets.identity import PIXEL_CHECK_SAMPLES, expected_spec, open_student_targets, teacher_sha
from pipeline.targets.spec import (FORMAT, IMAGES, TOPK_ARRAYS, TOPK_INDEX, TOPK_TAIL, TOPK_TARGET, TOPK_TARGET_CLASS,
                                   SplitLayout, TargetSpec, feature_array)
from pipeline.targets.store import (StoredImages, StoreWriter, TeacherTargets, bytes_on_disk, check_format,
                                    check_store_location, dense_logits, existing_store, filesystem, pixel_digests,
                                    store_info, topk_arrays, verify_store)

__all__ = ["FORMAT", "IMAGES", "StoredImages", "PIXEL_CHECK_SAMPLES", "TOPK_ARRAYS", "TOPK_INDEX", "TOPK_TAIL", "TOPK_TARGET",
           "TOPK_TARGET_CLASS", "SplitLayout", "StoreWriter", "TargetSpec", "TeacherTargets", "bytes_on_disk",
           "check_format", "check_store_location", "dense_logits", "existing_store", "expected_spec", "feature_array",
           "filesystem", "open_student_targets", "pixel_digests", "store_info", "teacher_sha", "topk_arrays",
           "verify_store"]
