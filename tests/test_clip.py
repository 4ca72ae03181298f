"""CLIP text prompts: the open_clip encoder (local files only), the text head, its training,
persistence, prompting with a phrase, and the commands, on a random-weight CLIP the tests build
(shapes and plumbing; what a real CLIP finds is the user's weights' business)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maskmill.engine.training.retrain import RetrainConfig, fit_text_prompts
from maskmill.engine.training.synthetic import scene, write_coco
from maskmill.engine.training.text_prompts import (
    TextPromptTrainingConfig,
    crop_box,
    text_prompt_examples,
    train_text_prompt_head,
)
from maskmill.model import Predictor, load_checkpoint, load_default, save_checkpoint
from maskmill.model.concepts import find_instances, require_text_head
from maskmill.model.text_encoder import ClipEncoder, ClipEncoderError
from maskmill.model.text_prompt_head import TextPromptHead

pytest.importorskip("open_clip")

# A CLIP small enough for a CPU test: 32-d joint space, 2-layer towers, 64-px images.
TINY_CLIP = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 64,
            "layers": 2,
            "width": 64,
            "head_width": 32,
            "patch_size": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 2,
        },
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    },
}
FAST = TextPromptTrainingConfig(
    steps=16,
    points_per_side=8,
    max_masks_per_image=6,
    negatives_per_image=6,
    prompt_masks_per_step=4,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def make_clip_folder(folder: Path, seed: int) -> Path:
    """A folder in Hugging Face's open_clip layout holding random weights (``seed``)."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return make_clip_folder(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


@pytest.fixture(scope="module")
def clip(clip_folder) -> ClipEncoder:
    return ClipEncoder.load(f"local-dir:{clip_folder}")


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


@pytest.fixture(scope="module")
def scenes():
    """Two generated scenes with named kinds, as training samples and images."""
    made = [scene(256, 256, seed=s, kind_colours=True) for s in (7001, 7002)]
    samples = [{"masks": [_rle(m) for m in s.instances], "categories": s.kinds} for s in made]
    return samples, [s.image for s in made]


@pytest.fixture(scope="module")
def trained(clip, scenes):
    """The shipped model with text prompts trained on the scenes, and the figures."""
    model = load_default()
    samples, images = scenes
    examples = text_prompt_examples(model, clip, samples, images, FAST)
    model.text_head, figures = train_text_prompt_head(model, clip, examples, FAST)
    return model, examples, figures


# ------------------------------------------------------------------------------ the encoder


def test_clip_encoder_embeds_phrases_and_crops_as_unit_vectors(clip):
    text = clip.encode_text(["hazelnut", "a red mug", "hazelnut"])
    assert text.shape == (3, 32) and text.dtype == torch.float32
    torch.testing.assert_close(text.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(text[0], text[2])  # deterministic
    assert not torch.allclose(text[0], text[1])
    crops = [np.full((20, 30, 3), 200, np.uint8), np.zeros((64, 10, 3), np.uint8)]
    images = clip.encode_crops(crops)
    assert images.shape == (2, 32)
    torch.testing.assert_close(images.norm(dim=1), torch.ones(2))
    assert clip.name == "tiny-clip" and clip.probe().shape == (32,)


def test_clip_encoder_never_downloads(tmp_path):
    with pytest.raises(ClipEncoderError, match="does not download"):
        ClipEncoder.load("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    with pytest.raises(ClipEncoderError, match="give its weights file"):
        ClipEncoder.load("ViT-B-32")  # a name alone would mean a download
    with pytest.raises(ClipEncoderError, match="no such CLIP weights file"):
        ClipEncoder.load("ViT-B-32", "laion2b_s34b_b79k")  # a pretrained tag is not a file
    with pytest.raises(ClipEncoderError, match="no open_clip_config.json"):
        ClipEncoder.load(f"local-dir:{tmp_path}")
    with pytest.raises(ClipEncoderError, match="unknown open_clip model 'ViT-Q-99'"):
        ClipEncoder.load("ViT-Q-99", str(tmp_path / "w.bin"))


# --------------------------------------------------------------------------------- training


def test_crop_box_grows_the_box_inside_the_image():
    assert crop_box([10, 20, 30, 40], 100, 100, 0.1) == (7, 16, 43, 64)
    assert crop_box([0, 0, 100, 50], 60, 100, 0.5) == (0, 0, 100, 60)


def test_examples_hold_masks_then_background_with_their_targets(trained, scenes):
    model, examples, _ = trained
    samples, _ = scenes
    masks = sum(min(len(s["masks"]), FAST.max_masks_per_image) for s in samples)
    assert examples.masks <= masks and examples.images == 2
    assert examples.clip.shape == (len(examples.labels), 32)
    assert examples.features.shape == (len(examples.labels), 2 * model.prompt_encoder.embed_dim)
    side = model.prompt_encoder.mask_input_size[0]
    assert examples.targets.shape == (examples.masks, side, side)
    assert examples.targets.flatten(1).any(1).all()  # every target has pixels
    # Masks carry their kind's column, background candidates -1.
    assert (examples.labels[: examples.masks] >= 0).all()
    assert (examples.labels[examples.masks :] == -1).all()
    assert examples.names == sorted({k for s in samples for k in s["categories"]})


def test_training_drives_the_loss_down_and_leaves_the_model_as_it_was(trained, clip, scenes):
    model, _, figures = trained
    assert figures["text_loss_last"] < figures["text_loss_first"]
    assert figures["text_prompt_loss_after"] < figures["text_prompt_loss_before"]
    shipped = load_default()
    for (name, ours), theirs in zip(
        model.state_dict().items(), shipped.state_dict().values(), strict=False
    ):
        if not name.startswith(("text_head.", "concept_head.")):
            torch.testing.assert_close(ours, theirs, msg=name)
    assert all(p.requires_grad for p in model.image_encoder.parameters())  # restored


# ------------------------------------------------------------------------------- prompting


def test_a_phrase_prompts_the_decoder_alone_or_with_points(trained, clip, scenes):
    model, _, _ = trained
    _, images = scenes
    predictor = Predictor(model)
    predictor.set_image(images[0])
    phrase = clip.encode_text(["mug"])[0]
    masks, ious, low_res = predictor.predict(text_embedding=phrase)
    assert masks.shape == (3, 256, 256) and ious.shape == (3,) and low_res.shape[0] == 3
    single, _, _ = predictor.predict(text_embedding=phrase, multimask_output=False)
    assert single.shape == (1, 256, 256)
    point = np.array([[128.0, 128.0]])
    with_point, _, _ = predictor.predict(point, np.array([1]), text_embedding=phrase)
    alone, _, _ = predictor.predict(point, np.array([1]))
    assert with_point.shape == alone.shape
    assert not np.array_equal(with_point, alone)  # the phrase is one more token
    with pytest.raises(ValueError, match=r"\(K, 32\)"):
        predictor.predict(text_embedding=np.zeros(31, np.float32))
    bare = Predictor(load_default())
    bare.set_image(images[0])
    with pytest.raises(ValueError, match="no text prompts"):
        bare.predict(text_embedding=phrase)


def test_find_instances_of_any_phrase(trained, clip, scenes):
    model, _, _ = trained
    _, images = scenes
    predictor = Predictor(model)
    predictor.set_image(images[1])
    found = predictor.predict_concept(["mug", "a striped cat"], threshold=0.0, text_encoder=clip)
    assert found and {r["category"] for r in found} <= {"mug", "a striped cat"}
    scores = [r["score"] for r in found]
    assert scores == sorted(scores, reverse=True) and 0.0 <= min(scores) <= max(scores) <= 1.0
    assert all(r["category_id"] is None for r in found)  # no concept head knows them
    with pytest.raises(ValueError, match="need the phrases"):
        find_instances(model, predictor.image_embedding, None, text_encoder=clip)


def test_another_clip_is_refused(trained, tmp_path):
    model, _, _ = trained
    other = ClipEncoder.load(f"local-dir:{make_clip_folder(tmp_path / 'other', seed=1)}")
    with pytest.raises(ValueError, match="not the one this model's text prompts were trained"):
        require_text_head(model, other)


def test_checkpoint_keeps_the_text_head_apart(trained, clip, tmp_path):
    model, _, _ = trained
    path = tmp_path / "model.pt"
    save_checkpoint(model, str(path))
    payload = torch.load(path, weights_only=False)
    assert not any(k.startswith("text_head.") for k in payload["state_dict"])
    assert payload["text_head"]["config"]["clip_name"] == "tiny-clip"
    loaded = load_checkpoint(str(path))
    assert isinstance(loaded.text_head, TextPromptHead)
    features = torch.randn(4, model.text_head.feature_dim)
    text = clip.encode_text(["mug", "fig"])
    torch.testing.assert_close(
        loaded.text_head.scores(features, text), model.text_head.scores(features, text)
    )
    require_text_head(loaded, clip)  # the probe travelled with it


# ---------------------------------------------------------------------------- engine and CLI


def test_store_to_fit_text_to_segment_and_eval(clip, clip_folder, tmp_path, capsys):
    """import-coco with kinds -> `maskmill fit-text` -> `segment --text --clip-model` and
    `eval --concepts --clip-model`, all on local files."""
    from maskmill.engine.evaluate import evaluate_concepts
    from maskmill.flows.cli import main
    from maskmill.storage import Store, import_coco

    # Three scenes, of which `--max-images 1` learns from one (each costs a grid of candidates).
    train = write_coco(tmp_path / "train", 3, seed=7200, height=256, width=256, kinds=True)
    store = Store(str(tmp_path / "store"))
    import_coco(str(train), str(tmp_path / "train" / "images"), store)
    out = tmp_path / "with-text.pt"
    clip_args = ["--clip-model", f"local-dir:{clip_folder}"]
    code = main(
        [
            "fit-text",
            "--store",
            store.url,
            "--checkpoint",
            str(load_default_path()),
            *clip_args,
            "--out",
            str(out),
            "--steps",
            "3",
            "--max-images",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert "learned text prompts from" in printed and " masks on 1 images " in printed
    assert load_checkpoint(str(out)).metadata["text_prompts"]["clip"] == "tiny-clip"

    held = write_coco(tmp_path / "held", 1, seed=7205, height=256, width=256, kinds=True)
    png = tmp_path / "found.png"
    code = main(
        [
            "segment",
            "--checkpoint",
            str(out),
            "--image",
            str(tmp_path / "held/images/000000.png"),
            "--text",
            "mug",
            "--threshold",
            "0",
            *clip_args,
            "--out",
            str(png),
        ]
    )
    assert code == 0 and png.is_file()
    lines = capsys.readouterr().out.splitlines()
    found = [line for line in lines if line.startswith("mug: score")]
    assert "CLIP tiny-clip" in lines[0] and lines[-1].startswith(f"{len(found)} instances")
    # `eval --concepts --clip-model` scores every category as a phrase (evaluate_concepts;
    # its interactive metrics are test_evaluate's).
    metrics = evaluate_concepts(
        load_checkpoint(str(out)), held, tmp_path / "held/images", text_encoder=clip
    )
    names = {c["name"] for c in json.loads(held.read_text())["categories"]}
    assert set(metrics["concept_categories"]) == names and metrics["concept_unknown"] == []
    assert 0.0 <= metrics["concept_ap50"] <= 1.0 and metrics["images"] == 1
    assert main(["eval", "--annotations", str(held), "--images", "x", *clip_args]) == 2
    assert "--clip-model is used by --concepts" in capsys.readouterr().err
    # The model without text prompts, and a CLIP weights file that is not there: one line each.
    assert main(["segment", "--text", "mug", *clip_args]) == 2
    assert "no CLIP text prompts" in capsys.readouterr().err
    assert (
        main(
            [
                "segment",
                "--text",
                "mug",
                "--clip-model",
                "ViT-B-32",
                "--clip-weights",
                str(tmp_path / "missing.bin"),
            ]
        )
        == 2
    )
    assert "no such CLIP weights file" in capsys.readouterr().err


def test_retrain_config_trains_text_prompts(clip, clip_folder, scenes, tmp_path):
    """What `maskmill run --clip-model` does in each retrain: fit_text_prompts on the samples."""
    samples, images = scenes
    for index, (sample, image) in enumerate(zip(samples, images, strict=True)):
        from PIL import Image

        path = tmp_path / f"{index}.png"
        Image.fromarray(image).save(path)
        sample["uri"] = str(path)
    model = load_default()
    config = RetrainConfig(clip_model=f"local-dir:{clip_folder}")
    figures = fit_text_prompts(model, samples, config, replace(FAST, steps=2))
    assert figures["text_images"] == 2 and figures["text_masks"] > 0
    require_text_head(model, clip)


def load_default_path() -> Path:
    """The shipped default model's file."""
    from maskmill.model.checkpoint import DEFAULT_CHECKPOINT

    return DEFAULT_CHECKPOINT
