"""Predictor behaviour: batched paths, image conversions, sizes, and prompt validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskmill.engine.training.synthetic import photo_like
from maskmill.model import Predictor

ONE_POINT = dict(point_coords=np.array([[200.0, 150.0]]), point_labels=np.array([1]))


def test_predict_shapes_and_types(tiny_predictor, photo):
    masks, iou, low_res = tiny_predictor.predict(**ONE_POINT)
    assert masks.shape == (3, *photo.shape[:2]) and masks.dtype == bool
    assert iou.shape == (3,) and iou.dtype == np.float32
    assert low_res.shape == (3, 128, 128)
    masks, iou, low_res = tiny_predictor.predict(**ONE_POINT, multimask_output=False)
    assert masks.shape == (1, *photo.shape[:2]) and iou.shape == (1,)
    logits, _, _ = tiny_predictor.predict(**ONE_POINT, return_logits=True)
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits > 0, tiny_predictor.predict(**ONE_POINT)[0])


def test_batched_prompts_match_single_calls(tiny_predictor):
    rng = np.random.default_rng(0)
    height, width = tiny_predictor.original_size
    coords = rng.uniform([0, 0], [width, height], size=(5, 2, 2))
    labels = np.array([[1, 0], [1, 1], [0, 1], [1, -1], [1, 0]])
    boxes = np.array(
        [
            [10, 20, 200, 180],
            [0, 0, width, height],
            [50, 50, 60, 70],
            [5, 5, 9, 9],
            [100, 10, 400, 290],
        ],
        dtype=float,
    )
    masks, iou, low_res = tiny_predictor.predict_batch(coords, labels, boxes)
    assert masks.shape == (5, 3, height, width) and iou.shape == (5, 3)
    for i in range(5):
        real = labels[i] != -1
        if not real.all():
            # A padding point is a "not a point" token the decoder attends to, as in SAM: the
            # prompt equals a batch of one with the same padding, not the unpadded prompt.
            _, _, expected = tiny_predictor.predict_batch(
                coords[i : i + 1], labels[i : i + 1], boxes[i : i + 1], upsample=False
            )
            assert np.abs(low_res[i].numpy() - expected[0].numpy()).max() < 1e-4
            continue
        single = tiny_predictor.predict(coords[i], labels[i], boxes[i])
        assert np.abs(low_res[i].numpy() - single[2]).max() < 1e-4
        assert np.abs(iou[i].numpy() - single[1]).max() < 1e-5
        # Logits agree to 1e-4, so thresholded masks may differ only at the few pixels whose
        # logit is within float noise of 0 (batched matmuls sum in another order).
        differing = int((masks[i].numpy() != single[0]).sum())
        assert differing <= 10, f"prompt {i}: {differing} pixels differ"


def test_batched_mask_prompts_match_single_calls(tiny_predictor):
    first = tiny_predictor.predict(**ONE_POINT)[2]
    mask_input = torch.from_numpy(first[:, None])  # 3 prompts of 1 x h x w
    _, iou, low_res = tiny_predictor.predict_batch(mask_input=mask_input, upsample=False)
    for i in range(3):
        single = tiny_predictor.predict(mask_input=first[i : i + 1])
        assert np.abs(low_res[i].numpy() - single[2]).max() < 1e-4


def test_encoder_batch_matches_one_by_one(tiny_model):
    images = [photo_like(200, 300, seed=s) for s in range(3)] + [photo_like(333, 123, seed=9)]
    predictor = Predictor(tiny_model)
    batched = predictor.embed_images(images, batch_size=4)
    for image, embedding in zip(images, batched, strict=True):
        predictor.set_image(image)
        assert embedding.original_size == image.shape[:2]
        assert torch.allclose(embedding.features, predictor.get_image_embedding(), atol=1e-4)
    predictor.set_image_embedding(batched[3])
    assert predictor.predict(**{**ONE_POINT, "point_coords": [[60.0, 200.0]]})[0].shape == (
        3,
        333,
        123,
    )


@pytest.mark.parametrize("shape", [(1, 1), (3, 700), (700, 3), (17, 29), (601, 601)])
def test_any_size_gives_masks_at_original_resolution(tiny_model, shape):
    image = photo_like(*shape, seed=2)
    predictor = Predictor(tiny_model)
    predictor.set_image(image)
    masks, _, _ = predictor.predict(point_coords=[[0.0, 0.0]], point_labels=[1])
    assert masks.shape == (3, *shape)


def test_grey_rgba_and_bgr_are_converted(tiny_model):
    rgb = photo_like(120, 160, seed=4)
    grey = rgb[..., 1]
    predictor = Predictor(tiny_model)
    predictor.set_image(np.repeat(grey[..., None], 3, axis=2))
    expected = predictor.get_image_embedding().clone()
    predictor.set_image(grey)
    assert torch.equal(predictor.get_image_embedding(), expected)
    predictor.set_image(grey[..., None])
    assert torch.equal(predictor.get_image_embedding(), expected)

    predictor.set_image(rgb)
    expected = predictor.get_image_embedding().clone()
    rgba = np.concatenate([rgb, np.full((120, 160, 1), 77, np.uint8)], axis=2)
    predictor.set_image(rgba)
    assert torch.equal(predictor.get_image_embedding(), expected)
    predictor.set_image(np.ascontiguousarray(rgb[..., ::-1]), image_format="BGR")
    assert torch.equal(predictor.get_image_embedding(), expected)
    predictor.set_image(rgb.astype(np.uint16) * 257)
    assert torch.equal(predictor.get_image_embedding(), expected)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((0, 5, 3), np.uint8), "image is empty"),
        (np.zeros((4, 4, 2), np.uint8), "must be H x W"),
        (np.zeros((4, 4, 3), np.float32), "dtype uint8"),
        ([[1, 2], [3, 4]], "numpy array"),
    ],
)
def test_bad_images(tiny_model, image, message):
    with pytest.raises(ValueError, match=message):
        Predictor(tiny_model).set_image(image)


def test_predict_before_set_image(tiny_model):
    with pytest.raises(RuntimeError, match="set_image"):
        Predictor(tiny_model).predict(**ONE_POINT)


BAD_PROMPTS = [
    (dict(point_coords=[[500.0, 10.0]], point_labels=[1]), "point_coords: point .* outside"),
    (dict(point_coords=[[-1.0, 10.0]], point_labels=[1]), "outside the image"),
    (dict(point_coords=[[10.0, np.nan]], point_labels=[1]), "point_coords contains NaN"),
    (dict(point_coords=[[10.0, np.inf]], point_labels=[1]), "point_coords contains NaN"),
    (dict(point_coords=[10.0, 10.0], point_labels=[1]), r"point_coords must have shape \(N, 2\)"),
    (dict(point_coords=[[1.0, 2.0, 3.0]], point_labels=[1]), "must have shape"),
    (dict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0)), "point_coords is empty"),
    (dict(point_coords=[[10.0, 10.0]], point_labels=[1, 0]), "point_labels must have shape"),
    (dict(point_coords=[[10.0, 10.0]], point_labels=[2]), "point_labels must be 0 or 1"),
    (dict(point_coords=[[10.0, 10.0]], point_labels=[-1]), "point_labels must be 0 or 1"),
    (dict(point_coords=[[10.0, 10.0]], point_labels=[0.5]), "point_labels must be 0 or 1"),
    (dict(point_coords=[[10.0, 10.0]]), "point_coords given without point_labels"),
    (dict(point_labels=[1]), "point_labels given without point_coords"),
    (dict(point_coords=[["a", "b"]], point_labels=[1]), "point_coords must be numeric"),
    (dict(box=[50.0, 10.0, 20.0, 40.0]), r"box must be XYXY with x0 <= x1"),
    (dict(box=[10.0, 50.0, 20.0, 40.0]), r"y0 <= y1"),
    (dict(box=[10.0, 10.0, 20.0]), r"box must have shape \(4,\)"),
    (dict(box=[10.0, 10.0, 20.0, np.nan]), "box contains NaN"),
    (dict(box=[10.0, 10.0, 900.0, 40.0]), "extends outside the image"),
    (dict(mask_input=np.zeros((1, 64, 64))), r"mask_input must have shape \(1, 128, 128\)"),
    (dict(mask_input=np.zeros((128, 128))), "mask_input must have shape"),
    (dict(mask_input=np.full((1, 128, 128), np.nan)), "mask_input contains NaN"),
    ({}, "no prompt given"),
]


@pytest.mark.parametrize("kwargs, message", BAD_PROMPTS)
def test_bad_prompts_raise_value_error_naming_the_argument(tiny_predictor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_predictor.predict(**kwargs)


def test_bad_batched_prompts(tiny_predictor):
    with pytest.raises(ValueError, match=r"point_coords must have shape \(B, N, 2\)"):
        tiny_predictor.predict_batch(point_coords=[[10.0, 10.0]], point_labels=[1])
    with pytest.raises(ValueError, match="only padding points"):
        tiny_predictor.predict_batch(point_coords=[[[10.0, 10.0]]], point_labels=[[-1]])
    with pytest.raises(ValueError, match="prompt batch sizes differ"):
        tiny_predictor.predict_batch(
            point_coords=[[[10.0, 10.0]]], point_labels=[[1]], boxes=[[1, 1, 5, 5], [1, 1, 5, 5]]
        )
    with pytest.raises(ValueError, match=r"boxes must have shape \(B, 4\)"):
        tiny_predictor.predict_batch(boxes=[1.0, 1.0, 5.0, 5.0])


coordinate = st.one_of(st.floats(-50, 500), st.sampled_from([np.nan, np.inf, -np.inf]))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    coords=st.one_of(
        st.none(),
        st.lists(st.lists(coordinate, min_size=1, max_size=3), min_size=0, max_size=4),
    ),
    labels=st.one_of(
        st.none(), st.lists(st.sampled_from([-1, 0, 1, 2, 0.5]), min_size=0, max_size=4)
    ),
    box=st.one_of(st.none(), st.lists(coordinate, min_size=3, max_size=5)),
    mask_side=st.one_of(st.none(), st.sampled_from([64, 128])),
    multimask=st.booleans(),
)
def test_fuzzed_prompts_give_masks_or_a_value_error(
    tiny_predictor, coords, labels, box, mask_side, multimask
):
    """Any prompt either yields well-formed masks consistent with its validity, or ValueError."""
    height, width = tiny_predictor.original_size
    mask_input = None if mask_side is None else np.zeros((1, mask_side, mask_side), np.float32)
    try:
        masks, iou, low_res = tiny_predictor.predict(
            point_coords=coords,
            point_labels=labels,
            box=box,
            mask_input=mask_input,
            multimask_output=multimask,
        )
    except ValueError as error:
        assert str(error)  # a message, always
        return
    count = 3 if multimask else 1
    assert masks.shape == (count, height, width) and masks.dtype == bool
    assert iou.shape == (count,) and np.all(np.isfinite(iou))
    assert low_res.shape == (count, 128, 128) and np.all(np.isfinite(low_res))
    # It succeeded, so the prompt must have been valid.
    if coords is not None:
        array = np.asarray(coords, dtype=float)
        assert array.ndim == 2 and array.shape[1] == 2 and len(array) > 0
        assert np.all((array >= 0) & (array <= [width, height]))
        assert set(labels) <= {0, 1} and len(labels) == len(array)
    if box is not None:
        x0, y0, x1, y1 = box
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
    if mask_input is not None:
        assert mask_side == 128
    assert coords is not None or box is not None or mask_input is not None


def test_bf16_encoder_autocast_gives_the_fp32_masks():
    """The image encoder under bf16 autocast (the GPU path, here on the CPU's autocast) gives
    the fp32 masks: the shipped model, box prompts of every object of a generated scene, mask
    IoU >= 0.98 on every one; the embedding keeps the model's dtype."""
    from pycocotools import mask as mask_utils
    from torchvision.ops import masks_to_boxes

    from maskmill.engine.training.synthetic import scene
    from maskmill.model import load_default

    model = load_default()
    painted = scene(seed=5)
    boxes = masks_to_boxes(torch.from_numpy(painted.instances)).numpy()  # XYXY
    masks = {}
    for precision in ("fp32", "bf16"):
        predictor = Predictor(model, encoder_precision=precision)
        predictor.set_image(painted.image)
        assert predictor.get_image_embedding().dtype == torch.float32
        masks[precision] = [
            predictor.predict(box=box, multimask_output=False)[0][0] for box in boxes
        ]
    assert len(boxes) >= 3
    for fp32, bf16 in zip(masks["fp32"], masks["bf16"], strict=True):
        a, b = (mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in (fp32, bf16))
        assert fp32.sum() > 0
        assert mask_utils.iou([b], [a], [0])[0, 0] >= 0.98


def test_encoder_precision_refuses_unknown_names(tiny_model):
    with pytest.raises(ValueError, match="encoder precision must be one of fp32, bf16, fp16"):
        Predictor(tiny_model, encoder_precision="int8")
