"""The DINO method in plain PyTorch: networks, loss, schedules, optimisation, augmentation.

No I/O, no cluster code, no YAML: tensors and plain arguments in, tensors out.
"""

from dino_cluster.dino.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropView,
    EvalTransform,
    MultiCropAugment,
    RandomOp,
)
from dino_cluster.dino.loss import DINOLoss
from dino_cluster.dino.model import (
    DINOHead,
    MultiCropWrapper,
    build_backbone,
    build_student_teacher,
    from_reference_state_dict,
    reference_state_dict,
)
from dino_cluster.dino.optim import (
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients,
    ema_update,
    param_groups,
    unwrap,
)
from dino_cluster.dino.schedules import (
    cosine_schedule,
    cosine_schedule_steps,
    scaled_lr,
    teacher_temp_schedule,
    teacher_temp_schedule_steps,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CropView",
    "DINOHead",
    "DINOLoss",
    "EvalTransform",
    "MultiCropAugment",
    "MultiCropWrapper",
    "RandomOp",
    "build_backbone",
    "build_optimizer",
    "build_student_teacher",
    "cancel_last_layer_gradients",
    "clip_gradients",
    "cosine_schedule",
    "cosine_schedule_steps",
    "ema_update",
    "from_reference_state_dict",
    "param_groups",
    "reference_state_dict",
    "scaled_lr",
    "teacher_temp_schedule",
    "teacher_temp_schedule_steps",
    "unwrap",
]
