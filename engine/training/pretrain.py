"""Pre-training by prompt simulation on generated scenes: the loop behind ``maskmill pretrain``.

Each step draws one synthetic scene (seed ``data_seed + step``), encodes it, and runs SAM's prompt
simulation (``model.prompt_simulation``) for a few of its instance and part masks together; one
AdamW step follows. Everything random is a function of the seeds and the step number, so a run
resumed from its training-state file continues exactly as an uninterrupted one would (up to
floating-point order).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maskmill.engine.training.synthetic import scene
from maskmill.model import Sam, build_model, load_checkpoint, save_checkpoint
from maskmill.model.prompt_simulation import (
    SimulationConfig,
    SimulationResult,
    prepare_image,
    prepare_masks,
    simulate,
)

STATE_FORMAT = "maskmill-train-state"
# Held-out scenes for evaluation start here; training seeds stay far below.
HELD_OUT_SEED = 10_000_000


@dataclass
class TrainConfig:
    """Settings of a pre-training run (all of them are saved in the training state).

    Attributes:
        config: model config to build from scratch (ignored with ``init_checkpoint``).
        init_checkpoint: start from these weights (official SAM file or maskmill checkpoint).
        steps: length of the learning-rate schedule, in images.
        lr: peak AdamW learning rate, reached after ``warmup`` steps, then cosine to 5 %.
        warmup: linear warm-up steps.
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clip.
        masks_per_image: masks of one scene simulated together (instances and parts).
        min_mask_area: smallest mask trained on, in pixels of the scene.
        scene_size: (H, W) of the generated scenes.
        freeze_image_encoder: train only the prompt encoder and mask decoder.
        seed: model initialisation and prompt-simulation seed.
        data_seed: seed of the first training scene.
        point_iterations: simulated corrective clicks per mask (SAM: 8).
        no_point_iterations: passes with only the mask prompt (SAM: 2).
    """

    config: str = "tiny"
    init_checkpoint: str | None = None
    steps: int = 2000
    lr: float = 5e-4
    warmup: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    masks_per_image: int = 6
    min_mask_area: int = 64
    scene_size: tuple[int, int] = (512, 512)
    freeze_image_encoder: bool = False
    seed: int = 0
    data_seed: int = 0
    point_iterations: int = 8
    no_point_iterations: int = 2

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.masks_per_image < 1:
            raise ValueError(f"masks_per_image must be at least 1, got {self.masks_per_image}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        self.scene_size = tuple(self.scene_size)

    @property
    def encoder_blocks(self) -> int | None:
        """Image-encoder blocks trained (:class:`PromptSimulationStep`): none or all."""
        return 0 if self.freeze_image_encoder else None

    @property
    def simulation(self) -> SimulationConfig:
        return SimulationConfig(
            point_iterations=self.point_iterations, no_point_iterations=self.no_point_iterations
        )


@dataclass
class TrainState:
    """Where a run stands: what ``--resume`` reads back."""

    config: TrainConfig
    step: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to 5 % of it at ``steps``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def training_sample(config: TrainConfig, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The scene of ``step`` and up to ``masks_per_image`` of its masks, chosen at random:
    (H, W, 3) uint8 image and (M, H, W) bool masks, M >= 1."""
    seed = config.data_seed + step
    while True:  # a scene whose objects are all tiny is skipped, deterministically
        generated = scene(*config.scene_size, seed=seed)
        masks = generated.all_masks(config.min_mask_area)
        if len(masks):
            break
        seed += 1_000_000_007
    rng = np.random.default_rng([config.seed, step])
    pick = rng.permutation(len(masks))[: config.masks_per_image]
    return generated.image, masks[np.sort(pick)]


class PromptSimulationStep(nn.Module):
    """The forward of one training step: image encoder, SAM's prompt simulation and its loss.

    One module, so that ``DistributedDataParallel`` (Ray Train's ``prepare_model``) sees the whole
    step in its forward and averages the workers' gradients during ``backward``; ``pretrain`` uses
    it unwrapped. The wrapped ``Sam`` is ``self.model``. ``encoder_blocks`` says what of its image
    encoder trains: all of it (None); nothing (0: ``requires_grad`` off, run under ``no_grad``);
    or the last ``encoder_blocks`` ViT blocks and the neck (the rest frozen, so the backward
    stops at the first trained block).
    """

    def __init__(
        self, model: Sam, simulation: SimulationConfig, encoder_blocks: int | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.simulation = simulation
        self.encoder_blocks = encoder_blocks
        _freeze(model, encoder_blocks)

    def forward(
        self, image: np.ndarray, masks: np.ndarray, generator: torch.Generator
    ) -> SimulationResult:
        """Simulate prompts for the (M, H, W) bool ``masks`` of the (H, W, 3) uint8 RGB ``image``
        (M >= 1, each mask non-empty) with prompts drawn from ``generator``; the result's
        ``loss`` is the scalar to back-propagate."""
        pixels, input_size = prepare_image(self.model, image)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder_blocks != 0):
            features = self.model.image_encoder(pixels)
        targets = prepare_masks(masks, self.model.image_size).to(self.model.device)
        return simulate(self.model, features, targets, input_size, self.simulation, generator)


def train_step(
    simulation_step: nn.Module,
    optimizer: torch.optim.Optimizer,
    image: np.ndarray,
    masks: np.ndarray,
    generator: torch.Generator,
    lr: float,
    grad_clip: float,
) -> SimulationResult:
    """One optimiser step on one image: forward of ``simulation_step`` (a
    :class:`PromptSimulationStep`, or one wrapped in ``DistributedDataParallel``, whose backward
    averages the workers' gradients), backward, gradient-norm clip at ``grad_clip``, AdamW step
    at learning rate ``lr``. ``image`` is (H, W, 3) uint8 RGB, ``masks`` (M, H, W) bool."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    result = simulation_step(image, masks, generator)
    result.loss.backward()
    trainable = [p for p in simulation_step.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    optimizer.step()
    return result


def build_optimizer(model: Sam, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; norms, biases and embeddings get no weight decay."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        plain = parameter.ndim < 2 or "pos_embed" in name or "rel_pos" in name
        (no_decay if plain else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))


def initial_model(config: TrainConfig) -> Sam:
    """Random weights of ``config.config`` (seeded), or the ``init_checkpoint``'s weights."""
    if config.init_checkpoint:
        return load_checkpoint(config.init_checkpoint)
    return build_model(config.config, seed=config.seed)


def save_state(path: str | Path, model: Sam, optimizer: torch.optim.Optimizer, state: TrainState):
    """Write the training state (model, optimiser, progress) atomically to a local file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": STATE_FORMAT,
        "model_config": model.config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "train_config": asdict(state.config),
        "step": state.step,
        "seconds": state.seconds,
        "history": state.history,
    }
    temporary = path.with_name(path.name + ".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)  # a killed run leaves the previous state whole


def load_state(path: str | Path) -> tuple[Sam, torch.optim.AdamW, TrainState]:
    """Read a training state written by :func:`save_state`.

    Raises:
        ValueError: naming the file when it is missing or not a training state.
    """
    from maskmill.model import SamConfig

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such training-state file")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a maskmill training state")
    config = TrainConfig(**payload["train_config"])
    model = build_model(SamConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["model"])
    _freeze(model, config.encoder_blocks)
    optimizer = build_optimizer(model, config)
    optimizer.load_state_dict(payload["optimizer"])
    state = TrainState(config, payload["step"], payload["seconds"], payload["history"])
    return model, optimizer, state


def _freeze(model: Sam, encoder_blocks: int | None) -> None:
    """Image-encoder parameters trained: all (None), none (0), or the last ``encoder_blocks``
    blocks and the neck."""
    encoder = model.image_encoder
    if encoder_blocks is not None and not 0 <= encoder_blocks <= len(encoder.blocks):
        raise ValueError(
            f"encoder_blocks must be None or 0..{len(encoder.blocks)} (the encoder's blocks), "
            f"got {encoder_blocks}"
        )
    encoder.requires_grad_(encoder_blocks is None)
    if encoder_blocks:
        for block in list(encoder.blocks)[-encoder_blocks:]:
            block.requires_grad_(True)
        encoder.neck.requires_grad_(True)


def pretrain(
    config: TrainConfig | None = None,
    *,
    resume: str | Path | None = None,
    steps: int | None = None,
    stop_at: int | None = None,
    state_path: str | Path = "out/pretrain/state.pt",
    minutes: float | None = None,
    save_every_minutes: float = 5.0,
    on_save: Callable[[Sam, TrainState], None] | None = None,
    progress: bool = True,
) -> tuple[Sam, TrainState]:
    """Train until ``config.steps`` or the ``minutes`` budget of this call runs out.

    Args:
        config: a new run's settings (ignored when resuming: the state's are used).
        resume: training-state file to continue from.
        steps: when resuming, a new schedule length (to train on past the saved one).
        stop_at: stop after this step even if the schedule goes on (to reproduce a run that a
            time budget stopped early).
        state_path: where the training state is saved, every ``save_every_minutes`` and at the
            end.
        minutes: wall-clock budget of this call; None trains to ``config.steps``.
        save_every_minutes: period of the state saves.
        on_save: called after each state save (e.g. to write a checkpoint).
        progress: show a tqdm bar.

    Returns:
        The model (train mode off) and its final state.
    """
    from tqdm import tqdm

    if resume is not None:
        model, optimizer, state = load_state(resume)
        if steps is not None:
            state.config.steps = steps
    else:
        config = config or TrainConfig()
        model = initial_model(config)
        _freeze(model, config.encoder_blocks)
        optimizer = build_optimizer(model, config)
        state = TrainState(config)
    config = state.config
    simulation_step = PromptSimulationStep(model, config.simulation, config.encoder_blocks).train()
    start = time.monotonic()
    deadline = start + minutes * 60 if minutes is not None else math.inf
    last_save = start
    recent: list[dict[str, float]] = []
    bar = tqdm(total=config.steps, initial=state.step, disable=not progress, unit="img")

    def checkpoint_now() -> None:
        nonlocal last_save
        state.seconds += time.monotonic() - last_save
        last_save = time.monotonic()
        save_state(state_path, model, optimizer, state)
        if on_save is not None:
            on_save(model, state)

    last_step = min(config.steps, stop_at if stop_at is not None else config.steps)
    while state.step < last_step and time.monotonic() < deadline:
        step = state.step
        image, masks = training_sample(config, step)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        result = train_step(
            simulation_step,
            optimizer,
            image,
            masks,
            generator,
            learning_rate(config, step),
            config.grad_clip,
        )
        state.step += 1
        recent.append(
            {
                "loss": float(result.loss.detach()),
                "mask_loss": float(result.mask_loss),
                "iou_loss": float(result.iou_loss),
                "first_iou": float(result.ious[0].mean()),
                "last_iou": float(result.ious[-1].mean()),
            }
        )
        if len(recent) == 25 or state.step == config.steps:
            averaged = {k: float(np.mean([r[k] for r in recent])) for k in recent[0]}
            state.history.append({"step": state.step, **averaged})
            recent.clear()
        bar.update(1)
        bar.set_postfix(
            loss=f"{recent[-1]['loss'] if recent else state.history[-1]['loss']:.3f}",
            iou1=f"{result.ious[0].mean():.2f}",
            iou_last=f"{result.ious[-1].mean():.2f}",
        )
        if time.monotonic() - last_save >= save_every_minutes * 60:
            checkpoint_now()
    bar.close()
    checkpoint_now()
    return model.eval(), state


def training_metadata(state: TrainState, command: str) -> dict[str, Any]:
    """Checkpoint metadata of a pre-trained model: the command, seeds, steps and last losses."""
    last = state.history[-4:]
    summary = {k: float(np.mean([h[k] for h in last])) for k in last[0]} if last else {}
    summary.pop("step", None)
    return {
        "command": command,
        "train_config": asdict(state.config),
        "steps": state.step,
        "train_seconds": round(state.seconds, 1),
        "final_train_metrics": summary,
        "data": "engine.training.synthetic.scene seeds data_seed .. data_seed + steps - 1",
    }


def save_pretrained(model: Sam, path: str, state: TrainState, command: str, **extra: Any) -> None:
    """Save the trained model as a float16 maskmill checkpoint with its training facts."""
    save_checkpoint(model, path, metadata={**training_metadata(state, command), **extra}, half=True)
