"""segment-anything, the reference implementation, built with a maskmill config's sizes.

Shared by the parity tests and the benchmarks, so both measure against the same thing.
"""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from maskmill.model.config import SamConfig


def build_reference(config: SamConfig) -> Sam:
    """segment-anything's ``Sam`` with the hyperparameters of ``config`` (random weights)."""
    grid = config.image_embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=config.encoder_depth,
            embed_dim=config.encoder_embed_dim,
            img_size=config.image_size,
            mlp_ratio=config.encoder_mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=config.encoder_num_heads,
            patch_size=config.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(config.encoder_global_attn_indexes),
            window_size=config.window_size,
            out_chans=config.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_embed_dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_num_heads,
            ),
            transformer_dim=config.prompt_embed_dim,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
    )
    return sam.eval()


def randomize_(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fill every weight with random values of a trained model's scale — norms near 1,
    projections at 1/sqrt(fan_in), relative-position tables and embeddings non-zero — so that
    every term takes part in the outputs; return the state dict."""
    generator = torch.Generator().manual_seed(seed)

    def normal(tensor: torch.Tensor, mean: float, std: float) -> None:
        tensor.copy_(mean + std * torch.randn(tensor.shape, generator=generator))

    with torch.no_grad():
        for name, param in module.named_parameters():
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            leaf = name.rsplit(".", 1)[-1]
            is_norm = "Norm" in type(owner).__name__
            if is_norm:
                normal(param, 1.0 if leaf == "weight" else 0.0, 0.1)
            elif leaf == "weight" and param.dim() > 1 and not isinstance(owner, torch.nn.Embedding):
                normal(param, 0.0, 1.0 / param[0].numel() ** 0.5)
            elif leaf == "bias":
                normal(param, 0.0, 0.02)
            else:  # embeddings, positional tables
                normal(param, 0.0, 0.2 if "rel_pos" in leaf or "pos_embed" in leaf else 1.0)
    return module.state_dict()
