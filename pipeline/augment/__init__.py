"""Augmented views that extraction and training rebuild identically.

A *view* of sample i is the input after an augmentation whose parameters are a pure function
of (augment.seed, i, view index v). View 0 is always the clean input. Extraction draws the
parameters, stores them beside the teacher's targets, and feeds the teacher
`apply(images, params, partners)`; training reads the stored parameters and rebuilds the very
same tensor for the student. Parameters are small int32 vectors whose fields `ParamLayout` names.

One concern per module, in the order a view is built (timm's training transform):

    kinds    the geometric base, one `Kind` per `augment.kind` (`KINDS`), and the `Geometry` of views
             cut from larger source pixels (ImageNet with `data.load_size`)
    recipe   timm's RandAugment on the raw image and RandomErasing on the normalized one, under
             generators seeded from the view's recipe seed
    mix      mixup or cutmix with a partner sample (`Mix` fields), partners, lam and soft targets
    layout   `ParamLayout`: the named slices of the parameter vector, recorded in the store manifest
    views    `ViewAugmenter`, which draws the parameters and applies them; `view_schedule`
"""

from __future__ import annotations

from pipeline.augment.kinds import (KINDS, PARAM_NAMES, EventFlipRoll, Geometry, Kind, NoAugment, PadCropFlip,
                                    ResizedCropFlip)
from pipeline.augment.layout import ParamLayout
from pipeline.augment.mix import (CUTMIX, MIX, MIXUP, UNMIXED, Mix, Mixer, mix_pixels, mixes, partner_inputs,
                                  smoothed_one_hot)
from pipeline.augment.recipe import (MAX_MAGNITUDE, RECIPE, apply_erasing, apply_randaugment, has_recipe,
                                     recipe_transforms, seeded)
from pipeline.augment.views import ViewAugmenter, view_augmenter, view_schedule

__all__ = [
    "CUTMIX", "KINDS", "MAX_MAGNITUDE", "MIX", "MIXUP", "PARAM_NAMES", "RECIPE", "UNMIXED",
    "EventFlipRoll", "Geometry", "Kind", "Mix", "Mixer", "NoAugment", "PadCropFlip", "ParamLayout", "ResizedCropFlip",
    "ViewAugmenter", "apply_erasing", "apply_randaugment", "has_recipe", "mix_pixels", "mixes", "partner_inputs",
    "recipe_transforms", "seeded", "smoothed_one_hot", "view_augmenter", "view_schedule",
]
