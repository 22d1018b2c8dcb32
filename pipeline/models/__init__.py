"""Model registry: `create_teacher` (any timm model) and `create_student` (registered SNNs).

Every model exposes timm's interface: `forward_features(x)` -> the penultimate feature
(for students: pooled and averaged over the T timesteps), `forward_head(f)` -> logits,
and `num_features`.
"""

from pipeline.models.student import STUDENTS, create_student, register_student
from pipeline.models.teacher import create_teacher, load_teacher, teacher_outputs

__all__ = ["STUDENTS", "create_student", "register_student", "create_teacher", "load_teacher", "teacher_outputs"]
