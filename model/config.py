"""Model configurations: the SAM sizes and maskmill's CPU-sized ``tiny``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class SamConfig:
    """Hyperparameters of a SAM-architecture model.

    Every field maps onto a constructor argument of segment-anything's own module classes, so any
    config is expressible with them (same module types, other sizes).

    Attributes:
        encoder_embed_dim: ViT width.
        encoder_depth: number of ViT blocks.
        encoder_num_heads: attention heads per ViT block.
        encoder_global_attn_indexes: blocks that attend globally; the others use windows.
        image_size: side of the square, padded model input in pixels (1024 for SAM).
        patch_size: ViT patch side; the image embedding is ``image_size // patch_size`` square.
        window_size: side of the attention windows, in patches.
        prompt_embed_dim: channels of the image embedding, the prompt tokens and the decoder.
        decoder_mlp_dim: hidden width of the two-way transformer's MLPs.
        decoder_depth: two-way transformer layers.
        decoder_num_heads: attention heads in the two-way transformer.
        mask_in_chans: hidden channels of the mask-prompt downscaler.
        num_multimask_outputs: ambiguity-aware masks (SAM: 3) besides the single-mask output.
        iou_head_depth: layers of the IoU-prediction MLP.
        iou_head_hidden_dim: hidden width of the IoU-prediction MLP.
    """

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    mask_in_chans: int = 16
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    encoder_mlp_ratio: float = 4.0
    name: str = field(default="custom", compare=False)

    @property
    def image_embedding_size(self) -> int:
        """Side of the square image embedding, in patches."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        data = asdict(self)
        data["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SamConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SamConfig fields {unknown}")
        data = dict(data)
        data["encoder_global_attn_indexes"] = tuple(data["encoder_global_attn_indexes"])
        return cls(**data)


CONFIGS: dict[str, SamConfig] = {
    # Small enough to train and run on a laptop CPU: 512 px input, 32x32 embedding, 8x8 windows
    # that tile it without padding, and a 128-channel decoder.
    "tiny": SamConfig(
        encoder_embed_dim=192,
        encoder_depth=6,
        encoder_num_heads=3,
        encoder_global_attn_indexes=(2, 5),
        image_size=512,
        window_size=8,
        prompt_embed_dim=128,
        decoder_mlp_dim=1024,
        name="tiny",
    ),
    "vit_b": SamConfig(
        encoder_embed_dim=768,
        encoder_depth=12,
        encoder_num_heads=12,
        encoder_global_attn_indexes=(2, 5, 8, 11),
        name="vit_b",
    ),
    "vit_l": SamConfig(
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
        name="vit_l",
    ),
    "vit_h": SamConfig(
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
        name="vit_h",
    ),
}


def get_config(name: str) -> SamConfig:
    """Return the named config (``tiny``, ``vit_b``, ``vit_l``, ``vit_h``)."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}"
        ) from None
