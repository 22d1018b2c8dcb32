"""Model registry: `create_teacher` (any timm model, or a trained bkd SNN as `bkd:<student>`) and
`create_student` (registered SNNs).

Every model exposes timm's interface: `forward_features(x)` -> the penultimate feature
(for students: pooled and averaged over the T timesteps), `forward_head(f)` -> logits,
and `num_features`. `teacher_outputs` reads a teacher's features at named locations.
"""

from pipeline.models.student import STUDENTS, create_student, register_student
from pipeline.models.teacher import (check_teacher_locations, create_teacher, is_snn_teacher, load_teacher,
                                     teacher_metadata, teacher_outputs)

__all__ = ["STUDENTS", "create_student", "register_student", "create_teacher", "load_teacher", "teacher_outputs",
           "check_teacher_locations", "is_snn_teacher", "teacher_metadata"]
