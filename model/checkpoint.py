"""Checkpoint I/O: official SAM ``.pth`` files and maskmill's own format, on any fsspec URL.

maskmill's format is a ``torch.save`` of a dict::

    {"format": "maskmill", "format_version": 1, "config": SamConfig.to_dict(),
     "state_dict": {official key: tensor}, "metadata": {...},
     "concept_head": {"config": ConceptHead.config_dict(), "state_dict": {...}},   # optional
     "text_head": {"config": TextPromptHead.config_dict(), "state_dict": {...}}}   # optional

The heads (``model.concept_head``, ``model.text_head``: :data:`HEADS`, absent from official
files) are kept apart from the official state dict, so that dict stays loadable by
segment-anything as it is.

An official SAM file is a bare state dict; its config is inferred from the tensor shapes.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import fsspec
import torch

from .build import build_model
from .concept_head import ConceptHead
from .config import CONFIGS, SamConfig
from .sam import Sam
from .text_prompt_head import TextPromptHead

FORMAT_NAME = "maskmill"
FORMAT_VERSION = 1
CONCEPT_HEAD_KEY = "concept_head"  # the payload key, and the attribute of Sam
TEXT_HEAD_KEY = "text_head"
# Optional heads kept beside the official state dict: payload key (= Sam attribute) -> class.
HEADS: dict[str, type[ConceptHead] | type[TextPromptHead]] = {
    CONCEPT_HEAD_KEY: ConceptHead,
    TEXT_HEAD_KEY: TextPromptHead,
}


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not hold a SAM-architecture model."""


def load_checkpoint(
    path_or_url: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Sam:
    """Load an official SAM checkpoint or a maskmill checkpoint, strictly.

    Args:
        path_or_url: local path or fsspec URL (``s3://…``, ``memory://…``, ``https://…``).
        device: where to put the model.
        dtype: parameter dtype of the returned model (checkpoints may store float16).

    Returns:
        The model in eval mode; ``model.metadata`` holds the checkpoint's metadata (empty for
        official files).

    Raises:
        CheckpointError: naming the file, when it cannot be read, is not a checkpoint, or its
            keys or tensor shapes do not match the architecture (listing the missing, unexpected
            and mis-shaped keys).
    """
    payload = _read(path_or_url)
    if isinstance(payload, dict) and payload.get("format") == FORMAT_NAME:
        version = payload.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{path_or_url}: maskmill checkpoint format_version {version!r} is not supported "
                f"(this maskmill reads {FORMAT_VERSION})"
            )
        try:
            config = SamConfig.from_dict(payload["config"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path_or_url}: invalid config: {error}") from None
        state_dict = payload.get("state_dict")
        metadata = dict(payload.get("metadata") or {})
        head_payloads = {key: payload[key] for key in HEADS if payload.get(key) is not None}
    elif (
        isinstance(payload, dict)
        and payload
        and all(isinstance(v, torch.Tensor) for v in payload.values())
    ):
        state_dict = payload
        config = infer_config(state_dict, source=path_or_url)
        metadata, head_payloads = {}, {}
    else:
        kind = type(payload).__name__
        keys = list(payload)[:5] if isinstance(payload, dict) else []
        raise CheckpointError(
            f"{path_or_url}: not a SAM checkpoint (a {kind}"
            + (f" with keys {keys}" if keys else "")
            + "); expected an official SAM state dict or a maskmill checkpoint"
        )
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path_or_url}: 'state_dict' is missing or not a dict")
    model = build_model(config)
    _load_strict(model, state_dict, source=path_or_url)
    for key, head_payload in head_payloads.items():
        setattr(model, key, _head(key, head_payload, source=path_or_url))
    model.metadata = metadata
    return model.to(device=device, dtype=dtype).eval()


def save_checkpoint(
    model: Sam,
    path_or_url: str,
    metadata: dict[str, Any] | None = None,
    half: bool = False,
) -> None:
    """Write ``model`` in maskmill's format to a local path or fsspec URL.

    Args:
        model: the model to save.
        path_or_url: destination.
        metadata: JSON-serialisable facts to keep with the weights (round, metrics, …).
        half: store float tensors as float16 (halves the file; loading restores float32).
    """
    buffer = io.BytesIO()
    torch.save(checkpoint_payload(model, metadata, half), buffer)
    with fsspec.open(path_or_url, "wb") as file:
        file.write(buffer.getvalue())


def checkpoint_payload(
    model: Sam, metadata: dict[str, Any] | None = None, half: bool = False
) -> dict[str, Any]:
    """The dict ``save_checkpoint`` writes, for callers that own the bytes themselves."""

    def tensors(module: torch.nn.Module, skip: str | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for key, tensor in module.state_dict().items():
            if skip and key.startswith(skip):
                continue
            tensor = tensor.detach().cpu()
            if half and tensor.is_floating_point():
                tensor = tensor.half()
            out[key] = tensor.clone()
        return out

    state_dict = tensors(model)
    state_dict = {k: v for k, v in state_dict.items() if k.split(".")[0] not in HEADS}
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": state_dict,
        "metadata": dict(metadata or {}),
    }
    for key in HEADS:
        head = getattr(model, key, None)
        if head is not None:
            payload[key] = {"config": head.config_dict(), "state_dict": tensors(head)}
    return payload


def _head(key: str, payload: Any, source: str) -> ConceptHead | TextPromptHead:
    """The head ``key`` stored beside the weights, loaded strictly."""
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(f"{source}: {key!r} must hold 'config' and 'state_dict'")
    try:
        head = HEADS[key].from_config(payload.get("config") or {})
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from None
    state_dict = payload["state_dict"]
    expected = head.state_dict()
    wrong = sorted(set(expected) ^ set(state_dict)) + sorted(
        key
        for key in set(expected) & set(state_dict)
        if getattr(state_dict[key], "shape", None) != expected[key].shape
    )
    if wrong:
        what = key.replace("_", " ")  # "concept head", "text head"
        raise CheckpointError(f"{source}: {what} does not match its config: {wrong[:10]}")
    head.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()})
    return head.eval()


def infer_config(state_dict: dict[str, torch.Tensor], source: str = "state dict") -> SamConfig:
    """Recover the hyperparameters of an official-format state dict from its tensor shapes.

    The decoder's head count does not show in any shape; SAM's 8 is assumed.
    """

    def tensor(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise CheckpointError(f"{source}: missing key {key!r}; not a SAM state dict")
        return state_dict[key]

    def count(pattern: str) -> int:
        regex = re.compile(pattern)
        return len({m.group(1) for k in state_dict if (m := regex.match(k))})

    patch_weight = tensor("image_encoder.patch_embed.proj.weight")  # (C, 3, p, p)
    embed_dim, patch_size = patch_weight.shape[0], patch_weight.shape[2]
    grid = tensor("image_encoder.pos_embed").shape[1]
    depth = count(r"image_encoder\.blocks\.(\d+)\.")
    if depth == 0:
        raise CheckpointError(f"{source}: no image_encoder.blocks.* keys; not a SAM state dict")
    rel_sizes = [tensor(f"image_encoder.blocks.{i}.attn.rel_pos_h").shape for i in range(depth)]
    head_dim = rel_sizes[0][1]
    global_indexes = tuple(i for i, shape in enumerate(rel_sizes) if shape[0] == 2 * grid - 1)
    window_sizes = {(shape[0] + 1) // 2 for shape in rel_sizes if shape[0] != 2 * grid - 1}
    if len(window_sizes) > 1:
        raise CheckpointError(f"{source}: blocks use different window sizes {sorted(window_sizes)}")
    window_size = window_sizes.pop() if window_sizes else grid
    mlp_hidden = tensor("image_encoder.blocks.0.mlp.lin1.weight").shape[0]
    iou_head_depth = count(r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.")
    config = SamConfig(
        encoder_embed_dim=embed_dim,
        encoder_depth=depth,
        encoder_num_heads=embed_dim // head_dim,
        encoder_global_attn_indexes=global_indexes,
        image_size=grid * patch_size,
        patch_size=patch_size,
        window_size=window_size,
        prompt_embed_dim=tensor("mask_decoder.iou_token.weight").shape[1],
        decoder_mlp_dim=tensor("mask_decoder.transformer.layers.0.mlp.lin1.weight").shape[0],
        decoder_depth=count(r"mask_decoder\.transformer\.layers\.(\d+)\."),
        mask_in_chans=tensor("prompt_encoder.mask_downscaling.3.weight").shape[0],
        num_multimask_outputs=tensor("mask_decoder.mask_tokens.weight").shape[0] - 1,
        iou_head_depth=iou_head_depth,
        iou_head_hidden_dim=tensor("mask_decoder.iou_prediction_head.layers.0.weight").shape[0],
        encoder_mlp_ratio=mlp_hidden / embed_dim,
    )
    for known in CONFIGS.values():
        if known == config:  # ``name`` is excluded from equality
            return known
    return config


def _read(path_or_url: str) -> Any:
    try:
        with fsspec.open(path_or_url, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path_or_url}: no such checkpoint file") from None
    except OSError as error:
        raise CheckpointError(f"{path_or_url}: cannot read checkpoint: {error}") from None
    if not data:
        raise CheckpointError(f"{path_or_url}: checkpoint file is empty")
    try:
        # weights_only: a checkpoint is data, never code to run.
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(
            f"{path_or_url}: not a readable PyTorch checkpoint (truncated or foreign file?): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from None


def _load_strict(model: Sam, state_dict: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()  # a freshly built model: no concept head
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = [
        f"{key}: file {tuple(getattr(state_dict[key], 'shape', ()))} vs model "
        f"{tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if not isinstance(state_dict[key], torch.Tensor)
        or state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or misshaped:
        parts = []
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("mis-shaped keys", misshaped),
        ):
            if items:
                shown = ", ".join(items[:10]) + (
                    f", … ({len(items)} in all)" if len(items) > 10 else ""
                )
                parts.append(f"{label}: {shown}")
        raise CheckpointError(
            f"{source}: checkpoint does not match the {model.config.name} architecture; "
            + "; ".join(parts)
        )
    # Checkpoints may store float16: copy into the float32 parameters.
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()}, strict=True)


DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "default.pt"


def has_default() -> bool:
    """Whether this installation ships the default model."""
    return DEFAULT_CHECKPOINT.is_file()


def load_default(device: str | torch.device = "cpu") -> Sam:
    """The small model shipped inside the package (no download).

    Raises:
        FileNotFoundError: when this build ships no default model.
    """
    if not has_default():
        raise FileNotFoundError(
            f"no default model is shipped in this build ({DEFAULT_CHECKPOINT} is missing); "
            "pass a checkpoint, or train one with `maskmill pretrain`"
        )
    return load_checkpoint(str(DEFAULT_CHECKPOINT), device=device)


DEFAULT_SOURCE = "maskmill default"


def load_model(
    checkpoint: str | None = None, device: str | torch.device = "cpu"
) -> tuple[Sam, str]:
    """``checkpoint`` if given, else the shipped default model: the one way every command and
    stage picks its starting model.

    Returns:
        (model, source): ``source`` is ``checkpoint`` or ``"maskmill default"``.

    Raises:
        CheckpointError: the checkpoint cannot be loaded.
        FileNotFoundError: no checkpoint given and this build ships no default model.
    """
    if checkpoint:
        return load_checkpoint(checkpoint, device=device), checkpoint
    return load_default(device=device), DEFAULT_SOURCE
