"""The automatic mask generator as the stages use it.

``model.mask_generator.MaskGenerator`` (at 9885d60) fails with a reshape error when no point of a
batch has a mask above ``pred_iou_thresh`` (an empty batch reaches ``predict_masks``), which a
strict threshold makes common. Until that is fixed there, the engine runs the generator with
``pred_iou_thresh=0`` and applies the threshold to its records afterwards. The result is the same
set of masks: NMS ranks by predicted IoU, so masks under the threshold, all ranked below every
mask over it, never suppress one of those.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maskmill.model import Sam
from maskmill.model.mask_generator import MaskGenerator


class Generator:
    """``MaskGenerator(model, **kwargs)`` whose IoU threshold is applied to its records."""

    def __init__(self, model: Sam, **kwargs: Any) -> None:
        self.pred_iou_thresh = float(kwargs.pop("pred_iou_thresh", 0.88))
        self.generator = MaskGenerator(model, pred_iou_thresh=0.0, **kwargs)

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """SA-1B records (see ``MaskGenerator.generate``) with predicted IoU over the threshold."""
        records = self.generator.generate(image)
        return [r for r in records if r["predicted_iou"] > self.pred_iou_thresh]
