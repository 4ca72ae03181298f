"""Prompt simulation, SAM's losses and the pre-training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from maskmill.engine.training.pretrain import (
    TrainConfig,
    learning_rate,
    load_state,
    pretrain,
    training_sample,
)
from maskmill.engine.training.synthetic import scene
from maskmill.model import SamConfig, build_model
from maskmill.model.losses import dice_loss, focal_loss, iou_loss, mask_iou, mask_loss
from maskmill.model.prompt_simulation import (
    SimulationConfig,
    iteration_schedule,
    low_res_targets,
    noisy_boxes,
    prepare_image,
    prepare_masks,
    sample_error_points,
    sample_points,
    simulate,
)

SIDE = 512  # tiny's input


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small ops on a shared 2-core machine run far faster without thread hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _square(side: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


# ---------------------------------------------------------------------------------- sampling


def test_error_points_lie_in_the_error_region_with_the_right_labels():
    gt = _square(64, 10, 40, 10, 40)
    predicted = _square(64, 20, 50, 10, 40)  # misses rows 10-19, spills into rows 40-49
    batch = 400
    coords, labels = sample_error_points(
        predicted.expand(batch, -1, -1),
        gt.expand(batch, -1, -1),
        generator=torch.Generator().manual_seed(0),
    )
    x, y = coords[:, 0].long(), coords[:, 1].long()
    assert torch.equal(coords, coords.round())
    assert (predicted[y, x] ^ gt[y, x]).all()
    assert torch.equal(labels, gt[y, x].long())  # 1 on missed foreground, 0 on spurious
    # Uniform over the error: both halves are 300 px, so about half the clicks each.
    assert 0.4 < labels.float().mean() < 0.6
    assert ((y >= 10) & (y < 20)).sum() == labels.sum()


def test_error_points_stay_inside_the_image_and_fall_back_to_the_target():
    gt = _square(32, 4, 12, 4, 12)
    predicted = gt | _square(32, 0, 32, 20, 32)  # spurious only in the padding columns
    valid = torch.zeros(32, 32, dtype=torch.bool)
    valid[:, :20] = True
    coords, labels = sample_error_points(predicted[None], gt[None], valid)
    # No error inside the image: a foreground click on the target.
    assert labels.tolist() == [1]
    assert gt[int(coords[0, 1]), int(coords[0, 0])]


def test_sample_points_is_uniform_inside_the_region():
    region = _square(16, 2, 4, 3, 8)[None].expand(2000, -1, -1)
    coords = sample_points(region, torch.Generator().manual_seed(1))
    x, y = coords[:, 0].long(), coords[:, 1].long()
    assert region[0][y, x].all()
    counts = torch.bincount(y * 16 + x, minlength=256)[region[0].flatten()]
    assert counts.numel() == 10 and counts.min() > 140 and counts.max() < 260
    with pytest.raises(ValueError, match="empty region"):
        sample_points(torch.zeros(1, 4, 4, dtype=torch.bool))


def test_noisy_boxes_enclose_the_mask_up_to_the_noise():
    gt = _square(100, 20, 60, 30, 50)[None]
    exact = noisy_boxes(gt, noise=0.0)
    assert exact.tolist() == [[30.0, 20.0, 49.0, 59.0]]  # XYXY of the first and last pixels
    noisy = noisy_boxes(gt.expand(500, -1, -1), noise=0.1, max_noise=5.0)
    assert ((noisy - exact).abs() <= 5.0 + 1e-5).all()
    assert (noisy - exact).abs().mean() > 0.5
    assert (noisy[:, :2] <= noisy[:, 2:]).all()


def test_iteration_schedule_has_sams_shape():
    schedules = [
        iteration_schedule(SimulationConfig(), torch.Generator().manual_seed(s)) for s in range(20)
    ]
    for schedule in schedules:
        assert len(schedule) == 10 and sum(schedule) == 8 and schedule[-1] is False
    # The other pass without a point moves around.
    assert len({schedule.index(False) for schedule in schedules}) > 3
    assert SimulationConfig().iterations == 11


# ------------------------------------------------------------------------------------ losses


def test_focal_and_dice_known_values():
    logits = torch.zeros(1, 2, 2)
    target = torch.ones(1, 2, 2)
    # p = 0.5: CE = ln 2, (1 - p_t)^2 = 1/4, alpha = 1/4.
    assert focal_loss(logits, target).item() == pytest.approx(math.log(2) / 16)
    # Dice: 1 - (2 * 2 + 1) / (2 + 4 + 1).
    assert dice_loss(logits, target).item() == pytest.approx(1 - 5 / 7)
    assert mask_loss(logits, target).item() == pytest.approx(20 * math.log(2) / 16 + 1 - 5 / 7)
    assert iou_loss(torch.tensor([0.5]), torch.tensor([0.75])).item() == pytest.approx(0.0625)


def test_the_right_mask_has_the_lowest_loss_and_iou_one():
    gt = _square(64, 10, 40, 20, 50).float()
    candidates = torch.stack(
        [
            _square(64, 10, 40, 20, 50),  # right
            _square(64, 15, 45, 20, 50),  # shifted
            _square(64, 10, 40, 20, 35),  # half
            _square(64, 0, 64, 0, 64),  # everything
            torch.zeros(64, 64, dtype=torch.bool),  # nothing
        ]
    )
    logits = candidates.float() * 16 - 8
    losses = mask_loss(logits, gt.expand_as(logits))
    assert losses.argmin().item() == 0
    assert losses[0] < 0.05 < losses[1:].min()
    ious = mask_iou(logits, gt.expand_as(logits))
    np.testing.assert_allclose(ious.numpy(), [1.0, 25 / 35, 0.5, 900 / 4096, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        mask_loss(logits, gt)


# ------------------------------------------------------------------------------- simulation


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


@pytest.fixture(scope="module")
def sample():
    generated = scene(SIDE, SIDE, seed=11)
    masks = generated.all_masks(400)[:3]
    return generated.image, masks


class _Recorder:
    """Wraps the prompt encoder's forward and keeps what each call was given."""

    def __init__(self, encoder):
        self.encoder, self.calls = encoder, []
        self.forward = encoder.forward

    def __call__(self, points, boxes, masks):
        self.calls.append((points, boxes, masks))
        return self.forward(points, boxes, masks)


@pytest.mark.parametrize("box_probability", [0.0, 1.0])
def test_simulated_prompts_are_where_they_must_be(model, sample, monkeypatch, box_probability):
    image, masks = sample
    features = torch.randn(1, 128, 32, 32)
    targets = prepare_masks(masks, SIDE)
    recorder = _Recorder(model.prompt_encoder)
    monkeypatch.setattr(model.prompt_encoder, "forward", recorder)
    config = SimulationConfig(box_probability=box_probability)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        result = simulate(model, features, targets, (SIDE, SIDE), config, generator)
    assert result.ious.shape == (11, len(masks))
    # Each pass: one sparse call, then (after the first pass) one call with the mask prompt.
    sparse_calls = [c for c in recorder.calls if c[2] is None]
    dense_calls = [c for c in recorder.calls if c[2] is not None]
    assert len(sparse_calls) == 11 and len(dense_calls) == 10
    previous = 0
    for index, (points, boxes, _) in enumerate(sparse_calls):
        if box_probability == 1.0:
            assert boxes is not None and boxes.shape == (len(masks), 4)
            rows, cols = torch.nonzero(targets[0], as_tuple=True)
            bounds = [cols.min(), rows.min(), cols.max(), rows.max()]
            assert (boxes[0] - torch.stack(bounds).float()).abs().max() <= 20.0 + 1e-4
            count = 0 if points is None else points[0].shape[1]
        else:
            assert boxes is None
            coords, labels = points
            # The first prompt: one foreground point on each mask.
            first = coords[:, 0].long()
            assert targets[torch.arange(len(masks)), first[:, 1], first[:, 0]].all()
            assert (labels[:, 0] == 1).all()
            count = coords.shape[1] - 1
        if index == 0:
            assert count == 0
            continue
        mask_prompt = dense_calls[index - 1][2]
        assert mask_prompt.shape == (len(masks), 1, 128, 128)
        assert count in (previous, previous + 1)
        if count == previous + 1:
            # The new click lies in the error of the mask fed back, labelled by the truth.
            coords, labels = points
            new, label = coords[:, -1].long(), labels[:, -1]
            predicted = (
                torch.nn.functional.interpolate(
                    mask_prompt, (SIDE, SIDE), mode="bilinear", align_corners=False
                )[:, 0]
                > 0
            )
            rows = torch.arange(len(masks))
            at_truth = targets[rows, new[:, 1], new[:, 0]]
            at_error = at_truth ^ predicted[rows, new[:, 1], new[:, 0]]
            has_error = ((predicted ^ targets).flatten(1)).any(dim=1)
            assert (at_error | ~has_error).all()
            assert torch.equal(label, at_truth.long())
        previous = count
    assert previous == 8


def test_ambiguous_point_trains_only_the_best_of_three(model, sample):
    # With one pass and a point prompt, the loss is the minimum over outputs 1..3 plus IoU MSE.
    image, masks = sample
    features = torch.randn(1, 128, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = prepare_masks(masks[:1], SIDE)
    config = SimulationConfig(point_iterations=0, no_point_iterations=0, box_probability=0.0)
    result = simulate(model, features, targets, None, config, torch.Generator().manual_seed(0))
    result.loss.backward()
    grads = [
        model.mask_decoder.output_hypernetworks_mlps[i].layers[-1].weight.grad for i in range(4)
    ]
    assert grads[0] is None or grads[0].abs().sum() == 0  # the single-mask output: unused
    trained = [i for i in (1, 2, 3) if grads[i] is not None and grads[i].abs().sum() > 0]
    assert len(trained) == 1
    model.zero_grad(set_to_none=True)


# A SAM of the same module types, small enough that a few optimiser steps take seconds.
MICRO = SamConfig(
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    image_size=128,
    window_size=4,
    prompt_embed_dim=32,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
    name="micro",
)


def test_a_few_steps_drive_the_loss_down():
    generated = scene(128, 128, seed=11)
    model = build_model(MICRO, seed=1).train()
    targets = prepare_masks(generated.all_masks(200)[:2], 128)
    config = SimulationConfig(point_iterations=2, no_point_iterations=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        pixels, input_size = prepare_image(model, generated.image)
        features = model.image_encoder(pixels)  # end to end, encoder included
        generator = torch.Generator().manual_seed(0)  # the same prompts every step
        result = simulate(model, features, targets, input_size, config, generator)
        result.loss.backward()
        optimizer.step()
        losses.append(result.loss.item())
    assert losses[-1] < 0.75 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))


def test_simulate_rejects_bad_input(model):
    features = torch.zeros(1, 128, 32, 32)
    with pytest.raises(ValueError, match="masks must have shape"):
        simulate(model, features, torch.ones(2, 64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="inside the image"):
        simulate(model, features, _square(SIDE, 500, 512, 0, 10)[None], (400, 512))


def test_prepare_masks_resizes_like_the_image():
    masks = np.zeros((1, 100, 200), dtype=bool)
    masks[0, 50:, :100] = True  # bottom-left quarter
    out = prepare_masks(masks, 512)
    assert out.shape == (1, 512, 512)
    assert not out[0, 256:].any()  # padding
    assert out[0, 129:256, :255].all() and not out[0, :127].any() and not out[0, :, 257:].any()
    assert low_res_targets(out, 128)[0, 32:64, :64].all()


# ---------------------------------------------------------------------------- training loop


def test_learning_rate_schedule():
    config = TrainConfig(steps=100, warmup=10, lr=1e-3)
    assert learning_rate(config, 0) == pytest.approx(1e-4)
    assert learning_rate(config, 10) == pytest.approx(1e-3)
    assert learning_rate(config, 100) == pytest.approx(5e-5)


def test_training_sample_is_deterministic():
    config = TrainConfig(masks_per_image=3, scene_size=(96, 96), min_mask_area=16)
    image, masks = training_sample(config, 4)
    image2, masks2 = training_sample(config, 4)
    np.testing.assert_array_equal(image, image2)
    np.testing.assert_array_equal(masks, masks2)
    assert 1 <= len(masks) <= 3 and masks.shape[1:] == (96, 96)


def test_pretrain_resumes_exactly(tmp_path):
    config = TrainConfig(
        steps=3,
        warmup=1,
        masks_per_image=1,
        point_iterations=1,
        no_point_iterations=0,
        freeze_image_encoder=True,
        scene_size=(128, 128),
    )
    straight, _ = pretrain(config, state_path=tmp_path / "a.pt", progress=False)
    pretrain(
        TrainConfig(**{**config.__dict__, "steps": 2}), state_path=tmp_path / "b.pt", progress=False
    )
    resumed, state = pretrain(
        resume=tmp_path / "b.pt", steps=3, state_path=tmp_path / "b.pt", progress=False
    )
    assert state.step == 3
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    model, _, loaded = load_state(tmp_path / "b.pt")
    assert loaded.step == 3 and loaded.history[-1]["step"] == 3
    # The frozen encoder did not move.
    fresh = build_model("tiny", seed=0)
    torch.testing.assert_close(
        model.image_encoder.patch_embed.proj.weight, fresh.image_encoder.patch_embed.proj.weight
    )
    with pytest.raises(ValueError, match="no such training-state"):
        load_state(tmp_path / "missing.pt")


def test_pretrain_cli_writes_a_loadable_checkpoint_and_resumes(tmp_path, capsys):
    from maskmill.flows.cli import main
    from maskmill.model import load_checkpoint

    state, out = tmp_path / "state.pt", tmp_path / "model.pt"
    common = ["--state", str(state), "--out", str(out), "--no-progress", "--threads", "1"]
    fast = ["--masks-per-image", "1", "--point-iterations", "0", "--no-point-iterations", "0"]
    assert main(["pretrain", "--steps", "1", "--freeze-image-encoder", *fast, *common]) == 0
    assert main(["pretrain", "--resume", str(state), "--steps", "2", *common]) == 0
    assert "trained 2/2 steps" in capsys.readouterr().out
    model = load_checkpoint(str(out))
    assert model.config.name == "tiny" and model.metadata["steps"] == 2
    assert model.metadata["command"].startswith("maskmill ")
    assert main(["pretrain", "--resume", str(tmp_path / "nothing.pt"), *common]) == 2


# ------------------------------------------------------------------------------ retraining


def test_encoder_blocks_choose_what_of_the_encoder_trains():
    from maskmill.engine.training.pretrain import PromptSimulationStep

    def trained(blocks):
        model = build_model(MICRO, seed=1)
        PromptSimulationStep(model, SimulationConfig(), blocks)
        encoder = model.image_encoder
        parts = {"patch_embed": encoder.patch_embed, "neck": encoder.neck}
        parts |= {f"block{i}": block for i, block in enumerate(encoder.blocks)}
        flags = {n: {p.requires_grad for p in m.parameters()} for n, m in parts.items()}
        assert all(len(f) == 1 for f in flags.values())  # a part trains whole or not at all
        assert all(p.requires_grad for p in model.mask_decoder.parameters())
        return sorted(n for n, f in flags.items() if f == {True})

    assert trained(None) == ["block0", "block1", "neck", "patch_embed"]
    assert trained(0) == []
    assert trained(1) == ["block1", "neck"]  # the last of MICRO's two blocks
    with pytest.raises(ValueError, match="encoder_blocks must be None or 0..2"):
        trained(3)


def test_schedule_steps_follow_the_documented_formula():
    from maskmill.engine.training.retrain import RetrainConfig, schedule_steps

    config = RetrainConfig(workers=2, masks_per_image=4, epochs=4, new_share=0.5)
    per_step = 2 * 4
    # No history: every draw is new, ceil(4 x 30 / 8) = 15.
    assert schedule_steps(30, 0, config) == 15 == math.ceil(4 * 30 / per_step)
    # With history to replay, half the draws are new: twice the steps for the same new masks.
    assert schedule_steps(30, 500, config) == 30 == math.ceil(4 * 30 / (0.5 * per_step))
    assert schedule_steps(3, 0, config) == config.min_steps  # a round of a few masks
    assert schedule_steps(10_000, 0, config) == config.max_steps  # bounded cost
    assert schedule_steps(0, 500, config) == 0  # nothing new: no retrain
    # More workers draw more masks per step: fewer steps for the same data.
    assert schedule_steps(60, 0, RetrainConfig(workers=4, epochs=4)) == 15
    with pytest.raises(ValueError, match="new_share=0.0"):
        RetrainConfig(new_share=0.0)


def _painted(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An image whose red channel is 255 exactly on the (2, H, W) masks (an L and a square)."""
    masks = np.zeros((2, height, width), bool)
    masks[0, 10:30, 5:12] = True
    masks[0, 24:30, 5:25] = True  # an L: a flip is visible
    masks[1, 8:20, 40:55] = True
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 1] = 90
    image[masks.any(0), 0] = 255
    return image, masks


@pytest.mark.parametrize("scale", [1.0, 1.5, 0.7])
def test_augment_keeps_masks_on_their_pixels(scale):
    from maskmill.engine.training.retrain import PAD_COLOUR, augment

    image, masks = _painted(40, 64)
    feet = {}
    for flip in (False, True):
        out_image, out_masks = augment(image, masks, flip, scale, offset=(0.3, 0.0))
        assert out_image.shape == image.shape and out_image.dtype == np.uint8
        assert out_masks.shape == masks.shape and out_masks.dtype == bool
        if scale == 1.0:
            np.testing.assert_array_equal(out_masks, masks[:, :, ::-1] if flip else masks)
            np.testing.assert_array_equal(out_image, image[:, ::-1] if flip else image)
        # Wherever a mask is, the image is red, and the other way round (up to the one-pixel
        # border that bilinear resampling blends).
        red = out_image[..., 0] > 200
        union = out_masks.any(0)
        assert union.sum() > 0.3 * masks.any(0).sum() * min(1.0, scale) ** 2
        assert (red & union).sum() >= 0.9 * union.sum()
        assert (red & union).sum() >= 0.9 * red.sum()
        if scale < 1:  # the canvas around the shrunk image is the mean colour
            assert tuple(out_image[0, 0]) == PAD_COLOUR and not out_masks[:, 0, 0].any()
        feet[flip] = np.nonzero(out_masks[0])[1].mean()
    assert feet[True] > feet[False] + 10  # mirrored: the L moved right
    with pytest.raises(ValueError, match="masks of its size"):
        augment(image, masks[:, :, :10])


def test_training_example_leaves_out_masks_the_crop_cut_away():
    from maskmill.engine.training.retrain import Draw, training_example

    image, masks = _painted(40, 64)
    # Scale 2, window at the top right: the square (rows 16..40, cols 80..110) stays, most of
    # the L (cols 10..50) is cut away.
    draw = Draw(index=0, pick=(0, 1), seed=0, flip=False, scale=2.0, offset=(0.0, 0.999))
    out_image, out_masks = training_example(image, list(masks), draw, long_side=128)
    assert out_masks.shape == (1, 40, 64)
    assert out_masks[0].sum() >= 0.5 * masks[1].sum() * 4
    assert (out_image[out_masks[0], 0] > 120).all()  # red (its border blended by bilinear)


def _samples(rounds: list[int], masks: list[int]) -> list[dict]:
    return [
        {"image_id": f"i{k}", "uri": "", "round": r, "masks": [{"counts": ""}] * n}
        for k, (r, n) in enumerate(zip(rounds, masks, strict=True))
    ]


def test_draws_mix_new_and_replayed_masks_as_documented():
    from maskmill.engine.training.retrain import RetrainConfig, _draw

    # Images 0-1 are old (rounds 1, 2), 2-3 new (round 3) with 1 and 3 masks.
    samples = _samples([1, 2, 3, 3], [5, 5, 1, 3])
    config = RetrainConfig(masks_per_image=2, new_share=0.5, seed=4)
    draws = [
        _draw(samples, config, step, rank, 2, seen_round=2)
        for step in range(1000)
        for rank in (0, 1)
    ]
    counts = np.bincount([d.index for d in draws], minlength=4) / len(draws)
    assert abs(counts[2:].sum() - 0.5) < 0.04  # new_share of the draws are new
    assert abs(counts[3] / counts[2:].sum() - 0.75) < 0.05  # by masks: 3 : 1
    assert abs(counts[0] - counts[1]) < 0.05  # replay spread over the old masks
    assert all(len(d.pick) == min(2, len(samples[d.index]["masks"])) for d in draws)
    assert all(list(d.pick) == sorted(set(d.pick)) for d in draws)  # distinct, in order
    flips = np.mean([d.flip for d in draws])
    scales = np.array([d.scale for d in draws])
    assert abs(flips - 0.5) < 0.04
    assert scales.min() >= 1 / 1.25 - 1e-9 and scales.max() <= 1.25 + 1e-9
    assert abs(np.log(scales).mean()) < 0.02  # log-uniform around 1
    assert len({d.seed for d in draws}) == len(draws)
    # A function of the seed, the step and the rank.
    assert _draw(samples, config, 7, 1, 2, seen_round=2) == draws[7 * 2 + 1]
    # Nothing seen yet (a starting model): every image is new and drawn by its masks.
    fresh = [_draw(samples, config, step, 0, 1).index for step in range(2000)]
    np.testing.assert_allclose(np.bincount(fresh) / 2000, np.array([5, 5, 1, 3]) / 14, atol=0.03)


def test_promotion_rule():
    from maskmill.engine.training.retrain import promotion

    base = {"miou": 0.70, "masks": 12, "images": 2}
    assert promotion(base, {**base, "miou": 0.71}, 0.005)[0]
    assert promotion(base, {**base, "miou": 0.696}, 0.005)[0]  # within the tolerance
    worse, why = promotion(base, {**base, "miou": 0.69}, 0.005)
    assert not worse and why.endswith("worse") and "0.7000 -> 0.6900" in why
    assert promotion({}, {}, 0.005) == (False, "no validation masks to compare on")


@pytest.fixture(scope="module")
def retrain_job(tmp_path_factory):
    """A MICRO base checkpoint and three scenes as image files with their masks as RLE, in the
    form of ``storage.queries.training_set`` (one image of round 1, two of round 2); also the
    scenes' pixels, by image id."""
    from PIL import Image

    from maskmill.model import save_checkpoint
    from maskmill.storage import rle

    folder = tmp_path_factory.mktemp("retrain")
    base = str(folder / "base.pt")
    save_checkpoint(build_model(MICRO, seed=1), base)
    samples, pixels = [], {}
    for seed, round_ in ((11, 1), (12, 2), (13, 2)):
        generated = scene(96, 96, seed=seed)
        uri = str(folder / f"scene-{seed}.png")
        Image.fromarray(generated.image).save(uri)  # lossless: workers read these pixels
        image_id = f"scene-{seed}"
        masks = [rle.encode(m) for m in generated.all_masks(64)]
        samples.append({"image_id": image_id, "uri": uri, "round": round_, "masks": masks})
        pixels[image_id] = generated.image
    return base, samples, pixels


def _data_parallel_reference(base, samples, pixels, config, steps, seen_round, ranks):
    """What data-parallel workers ``ranks`` of ``config.workers`` train, computed in one process:
    per step, each rank's draw's gradient, their mean (a parameter no rank used keeps no
    gradient), the clip, one AdamW step."""
    from maskmill.engine.training.pretrain import PromptSimulationStep, build_optimizer
    from maskmill.engine.training.retrain import _draw, retrain_schedule, training_example
    from maskmill.model import load_checkpoint
    from maskmill.storage import rle

    schedule = retrain_schedule(config, steps)
    model = load_checkpoint(base)
    step_module = PromptSimulationStep(model, schedule.simulation, config.encoder_blocks)
    step_module.train()
    optimizer = build_optimizer(model, schedule)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(schedule, step)
        per_rank = []
        for rank in ranks:
            optimizer.zero_grad(set_to_none=True)
            draw = _draw(samples, config, step, rank, config.workers, seen_round)
            sample = samples[draw.index]
            masks = [rle.decode(m) for m in sample["masks"]]
            image, picked = training_example(
                pixels[sample["image_id"]], masks, draw, model.image_size
            )
            generator = torch.Generator().manual_seed(draw.seed)
            step_module(image, picked, generator).loss.backward()
            per_rank.append([p.grad for p in trainable])
        for parameter, grads in zip(trainable, zip(*per_rank, strict=True), strict=True):
            used = [g for g in grads if g is not None]
            parameter.grad = sum(used) / len(ranks) if used else None
        torch.nn.utils.clip_grad_norm_(trainable, schedule.grad_clip)
        optimizer.step()
    return model.eval()


def test_two_worker_retrain_averages_gradients_and_repeats_exactly(ray_cluster, retrain_job):
    from maskmill.engine.training.retrain import RetrainConfig, _fit
    from maskmill.model import load_checkpoint

    base, samples, pixels = retrain_job
    config = RetrainConfig(workers=2, lr=1e-3, masks_per_image=2, encoder_blocks=1, seed=5)
    first, metrics = _fit(base, samples, config, steps=3, seen_round=1)
    second, _ = _fit(base, samples, config, steps=3, seen_round=1)

    assert metrics["steps"] == 3 and metrics["workers"] == 2
    # One machine: both ranks on its one node (tests/test_ray_cluster.py checks two nodes).
    assert metrics["train_worker_nodes"] == 1 and len(metrics["train_node_ids"]) == 1
    # On what: DDP over gloo on CPUs (NCCL where Ray Train gives each worker a GPU).
    from maskmill.engine.ray_pool import gpus_available

    on_gpus = gpus_available(at_least=2)
    assert metrics["train_device"] == ("cuda" if on_gpus else "cpu")
    assert metrics["train_backend"] == ("nccl" if on_gpus else "gloo")
    assert metrics["train_loss_first"] > 0 and 0.0 <= metrics["train_iou_final_last"] <= 1.0
    # The same command trains the same model, bit for bit.
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # The encoder's first block stayed; its last block and the decoder moved.
    start = load_checkpoint(base)
    torch.testing.assert_close(
        first.image_encoder.blocks[0].state_dict(),
        start.image_encoder.blocks[0].state_dict(),
        rtol=0,
        atol=0,
    )
    last_block = first.image_encoder.blocks[-1].mlp.lin2.weight
    assert not torch.equal(last_block, start.image_encoder.blocks[-1].mlp.lin2.weight)
    moved = first.mask_decoder.iou_prediction_head.layers[-1].weight
    assert not torch.equal(moved, start.mask_decoder.iou_prediction_head.layers[-1].weight)
    # It is the mean gradient of both workers' draws that trained it: a worker training on its
    # own draws alone (no synchronisation) would land elsewhere.
    reference = _data_parallel_reference(base, samples, pixels, config, 3, 1, ranks=[0, 1])
    for (name, a), b in zip(
        first.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    alone = _data_parallel_reference(base, samples, pixels, config, 3, 1, ranks=[0])
    assert not torch.equal(moved, alone.mask_decoder.iou_prediction_head.layers[-1].weight)


# ------------------------------------------------------------------ validation and promotion


@pytest.fixture(scope="module")
def annotated_store(tmp_path_factory):
    """A store of 8 generated scenes (96 x 96) with ground truth, planned as 2 manual rounds
    (seed 0, a quarter held out), whose round images have the ground truth as their manual
    masks (an annotator that finishes every object); the shipped model as v1."""
    from maskmill.engine.plan import ensure_initial_model, make_plan
    from maskmill.engine.training.synthetic import write_coco
    from maskmill.storage import StageWriter, Store, import_coco
    from maskmill.storage.queries import ground_truth

    folder = tmp_path_factory.mktemp("annotated")
    annotations = write_coco(folder, 8, seed=21, height=96, width=96, parts=False)
    store = Store(str(folder / "store"))
    import_coco(str(annotations), str(folder / "images"), store)
    plan = make_plan(store, manual_rounds=2, semi_rounds=0, auto=False, seed=0)
    truth = ground_truth(store)
    for round_, stage, ids in plan.rounds():
        with StageWriter(store, round_, stage) as writer:
            for image_id in ids:
                records = [{"image_id": image_id, "segmentation": m} for m in truth[image_id]]
                writer.write_masks(image_id, records, source="annotator")
            writer.finish(model_version=1)
    ensure_initial_model(store, plan)
    return store, plan


def test_the_validation_split_is_part_of_each_round_and_never_held_out(annotated_store):
    from maskmill.engine.plan import make_plan

    store, plan = annotated_store
    assert len(plan.heldout) == 2 and [len(ids) for ids in plan.manual] == [3, 3]
    assert not set(plan.validation) & set(plan.heldout)
    for ids in plan.manual:  # one in five, at least one of a round of two or more
        assert len(set(ids) & set(plan.validation)) == 1
    assert plan.validation == sorted(plan.validation)
    again = make_plan(store, manual_rounds=2, semi_rounds=0, auto=False, seed=0)
    assert again.validation == plan.validation and again.heldout == plan.heldout
    others = {tuple(make_plan(store, 2, 0, False, seed=s).validation) for s in range(1, 6)}
    assert len(others) > 1  # drawn by the seed
    bigger = make_plan(store, manual_rounds=1, semi_rounds=0, auto=False, validation=0.5)
    assert len(bigger.validation) == 3 and set(bigger.validation) <= set(bigger.manual[0])
    single = make_plan(store, manual_rounds=6, semi_rounds=0, auto=False)
    assert single.validation == []  # rounds of one image keep it for training
    with pytest.raises(ValueError, match="validation must be a share"):
        make_plan(store, 2, 0, validation=1.0)


def test_a_worse_retrain_is_not_promoted_and_the_next_round_keeps_the_model(
    ray_cluster, annotated_store
):
    from maskmill.engine.plan import model_for_round
    from maskmill.engine.training.retrain import RetrainConfig, data_digest, retrain
    from maskmill.model import load_checkpoint
    from maskmill.storage.queries import training_set

    store, plan = annotated_store
    fast = {"workers": 2, "masks_per_image": 1, "encoder_blocks": 0, "stages": ("manual",)}
    v1 = model_for_round(store, 1)
    # A learning rate of 1 wrecks the decoder in two steps: worse on validation, kept out.
    wrecked = retrain(store, 1, plan, v1, RetrainConfig(steps=2, lr=1.0, **fast))
    assert (wrecked["version"], wrecked["round"], wrecked["promoted"]) == (2, 1, False)
    scores = wrecked["validation"]
    assert scores["candidate"]["miou"] < scores["base"]["miou"] - 0.1
    assert scores["base"]["images"] == 1 and scores["base"]["masks"] > 0
    assert wrecked["rejected"] == wrecked["decision"] and wrecked["decision"].endswith("worse")
    assert wrecked["preset_calibration"] == {"skipped": "not promoted"}
    assert "heldout_miou" in wrecked["metrics"]  # the rounds table still shows what it made
    # Trained on round 1's images but its validation image, never on held-out ones.
    train_ids = sorted(set(plan.manual[0]) - set(plan.validation))
    expected = training_set(store, ("manual",), 2, only=train_ids)
    assert wrecked["data_digest"] == data_digest(expected)
    assert wrecked["metrics"]["train_images"] == len(train_ids) == 2
    assert wrecked["metrics"]["new_masks"] == sum(len(s["masks"]) for s in expected)
    # The next round uses v1 again; the rejected version stays stored.
    assert model_for_round(store, 2)["version"] == 1
    assert load_checkpoint(wrecked["uri"]) is not None
    # A rerun of the same retrain finds it done: no second training, no new version.
    assert retrain(store, 1, plan, v1, RetrainConfig(steps=2, lr=1.0, **fast)) == wrecked
    assert len(store.model_metas()) == 2

    # A candidate that moves (almost) nothing is not worse (up to its float noise, within the
    # tolerance given): promoted, and round 3 uses it.
    gentle = RetrainConfig(steps=1, lr=1e-9, tolerance=0.005, **fast)
    kept = retrain(store, 2, plan, model_for_round(store, 3), gentle)
    assert (kept["version"], kept["base_version"], kept["promoted"]) == (3, 1, True)
    assert "rejected" not in kept
    assert abs(kept["validation"]["candidate"]["miou"] - kept["validation"]["base"]["miou"]) < 0.005
    assert kept["validation"]["base"]["images"] == 2  # both rounds' validation images
    # v1 had seen none of the store: both rounds' masks are new to it.
    assert kept["metrics"]["replayed_masks"] == 0 and kept["metrics"]["train_images"] == 4
    assert model_for_round(store, 3)["version"] == 3
