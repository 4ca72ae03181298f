"""Builds a SAM-architecture model from a config."""

from __future__ import annotations

import torch

from .config import SamConfig, get_config
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .two_way_transformer import TwoWayTransformer


def build_model(config: str | SamConfig = "tiny", seed: int | None = None) -> Sam:
    """Build a model with random weights.

    Args:
        config: a config name (``tiny``, ``vit_b``, ``vit_l``, ``vit_h``) or a ``SamConfig``.
        seed: seed for the random initialisation; None uses torch's global generator.

    Returns:
        The model in eval mode on the CPU.
    """
    if isinstance(config, str):
        config = get_config(config)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _build(config)
    return _build(config)


def _build(config: SamConfig) -> Sam:
    grid = config.image_embedding_size
    image_encoder = ImageEncoderViT(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.encoder_embed_dim,
        depth=config.encoder_depth,
        num_heads=config.encoder_num_heads,
        mlp_ratio=config.encoder_mlp_ratio,
        out_chans=config.prompt_embed_dim,
        qkv_bias=True,
        use_rel_pos=True,
        window_size=config.window_size,
        global_attn_indexes=tuple(config.encoder_global_attn_indexes),
    )
    prompt_encoder = PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(config.image_size, config.image_size),
        mask_in_chans=config.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=config.prompt_embed_dim,
        transformer=TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.prompt_embed_dim,
            mlp_dim=config.decoder_mlp_dim,
            num_heads=config.decoder_num_heads,
        ),
        num_multimask_outputs=config.num_multimask_outputs,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    return Sam(config, image_encoder, prompt_encoder, mask_decoder).eval()
