"""Generator presets: the thresholds at which a model's automatic masks are kept, stored with its
weights so that every generator of that model uses them.

A checkpoint's metadata carries them under ``generator_presets``::

    {"auto": {"pred_iou_thresh": 0.3, "stability_score_thresh": 0.6},
     "semi": {"pred_iou_thresh": 0.4, "stability_score_thresh": 0.7}}

``auto`` is the fully automatic stage (keep what is probably right), ``semi`` the
semi-automatic pre-fill (keep only what is confidently right, people add the rest). A model's IoU
head is calibrated to its own quality: SAM's 0.88 / 0.95 keep nothing of a small model whose
predicted IoUs stay below 0.6, so the thresholds belong to the weights, not to the code.
Official SAM files carry no metadata and get SAM's own values (:data:`SAM_PRESETS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

PRESET_NAMES = ("auto", "semi")
# SAM's automatic-stage thresholds (SA-1B: predicted IoU >= 0.88, stability >= 0.95); the
# semi-automatic pre-fill keeps only more confident masks.
SAM_PRESETS: dict[str, dict[str, float]] = {
    "auto": {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95},
    "semi": {"pred_iou_thresh": 0.92, "stability_score_thresh": 0.97},
}
REQUIRED_KEYS = ("pred_iou_thresh", "stability_score_thresh")


def generator_presets(model_or_metadata: Any) -> dict[str, dict[str, Any]]:
    """The generator presets of a model: its checkpoint metadata's ``generator_presets``, else
    SAM's (:data:`SAM_PRESETS`, for official files and models without metadata).

    Args:
        model_or_metadata: a ``Sam`` (its ``metadata`` is read) or a metadata dict.

    Returns:
        ``{"auto": {...}, "semi": {...}}``: ``MaskGenerator`` keyword arguments, a fresh copy.

    Raises:
        ValueError: the stored presets are malformed (the message names the preset and key).
    """
    metadata = getattr(model_or_metadata, "metadata", model_or_metadata) or {}
    stored = metadata.get("generator_presets") if isinstance(metadata, Mapping) else None
    if stored is None:
        return {name: dict(values) for name, values in SAM_PRESETS.items()}
    return check_presets(stored)


def check_presets(presets: Any, source: str = "generator_presets") -> dict[str, dict[str, Any]]:
    """Validate presets; returns a plain copy.

    Each of ``auto`` and ``semi`` must be a dict of ``MaskGenerator`` parameters with at least
    ``pred_iou_thresh`` and ``stability_score_thresh``, thresholds finite numbers in [0, 1].
    """
    from .mask_generator import generator_parameters

    if not isinstance(presets, Mapping):
        raise ValueError(f"{source}: expected a dict with keys {PRESET_NAMES}, got {presets!r}")
    parameters = generator_parameters()
    out: dict[str, dict[str, Any]] = {}
    for name in PRESET_NAMES:
        values = presets.get(name)
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}[{name!r}]: missing or not a dict ({values!r})")
        unknown = sorted(set(values) - parameters)
        if unknown:
            raise ValueError(f"{source}[{name!r}]: {unknown} are not MaskGenerator parameters")
        for key in REQUIRED_KEYS:
            value = values.get(key)
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not math.isfinite(value)
                or not 0.0 <= value <= 1.0
            ):
                raise ValueError(
                    f"{source}[{name!r}][{key!r}]: must be a number in [0, 1], got {value!r}"
                )
        out[name] = dict(values)
    return out
