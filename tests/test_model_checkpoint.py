"""Checkpoint I/O: maskmill's format round trip, official-file config inference, clear errors."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

from maskmill.model import (
    CONFIGS,
    CheckpointError,
    Predictor,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from maskmill.model.checkpoint import infer_config


def _shapes_only_state_dict(name: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return build_model(name).state_dict()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_infer_config_recovers_every_named_config(name):
    config = infer_config(_shapes_only_state_dict(name))
    assert config == CONFIGS[name]
    assert config.name == name


def test_official_state_dict_keys_match_reference_for_vit_h():
    """The official key set: segment-anything's vit_h, built on the meta device (no memory)."""
    from bench.reference import build_reference

    with torch.device("meta"):
        reference = build_reference(CONFIGS["vit_h"]).state_dict()
    ours = _shapes_only_state_dict("vit_h")
    assert list(ours) == list(reference)
    assert all(ours[k].shape == reference[k].shape for k in ours)


@pytest.mark.parametrize("half", [False, True])
def test_maskmill_format_round_trip(tmp_path, tiny_model, photo, half):
    path = tmp_path / "model.pt"
    save_checkpoint(tiny_model, str(path), metadata={"round": 3, "miou": 0.5}, half=half)
    loaded = load_checkpoint(str(path))
    assert loaded.config == tiny_model.config
    assert loaded.metadata == {"round": 3, "miou": 0.5}
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    original, restored = Predictor(tiny_model), Predictor(loaded)
    original.set_image(photo)
    restored.set_image(photo)
    prompt = dict(point_coords=np.array([[200.0, 150.0]]), point_labels=np.array([1]))
    expected, got = original.predict(**prompt), restored.predict(**prompt)
    tolerance = 5e-2 if half else 1e-6
    assert np.abs(expected[2] - got[2]).max() <= tolerance
    if half:  # half precision roughly halves the file
        assert path.stat().st_size < 0.6 * _full_size(tiny_model, tmp_path)


def _full_size(model, tmp_path) -> int:
    path = tmp_path / "full.pt"
    save_checkpoint(model, str(path))
    return path.stat().st_size


def test_fsspec_memory_url(tiny_model):
    url = "memory://maskmill-tests/checkpoints/tiny.pt"
    save_checkpoint(tiny_model, url)
    loaded = load_checkpoint(url)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="nope.pth: no such checkpoint file"):
        load_checkpoint(str(path))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth: checkpoint file is empty"):
        load_checkpoint(str(path))


def test_truncated_file(tmp_path, tiny_model):
    buffer = io.BytesIO()
    torch.save(tiny_model.state_dict(), buffer)
    path = tmp_path / "truncated.pth"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(str(path))


def test_foreign_files(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(str(text))
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(10)}, other)
    with pytest.raises(CheckpointError, match=r"resnet.pth: missing key 'image_encoder\."):
        load_checkpoint(str(other))
    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    with pytest.raises(CheckpointError, match="list.pth: not a SAM checkpoint"):
        load_checkpoint(str(listing))


def test_pickled_code_is_refused(tmp_path):
    """weights_only loading: a pickle that would run code is rejected, not executed."""
    path = tmp_path / "evil.pth"

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_checkpoint(str(path))


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path, tiny_model):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.extra.weight"] = torch.zeros(3)
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 7)
    path = tmp_path / "broken.pth"
    torch.save(
        {
            "format": "maskmill",
            "format_version": 1,
            "config": tiny_model.config.to_dict(),
            "state_dict": state,
        },
        path,
    )
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(str(path))
    message = str(error.value)
    assert message.startswith(f"{path}: checkpoint does not match the tiny architecture")
    assert "missing keys: mask_decoder.iou_token.weight" in message
    assert "unexpected keys: mask_decoder.extra.weight" in message
    assert "prompt_encoder.no_mask_embed.weight: file (1, 7) vs model (1, 128)" in message


def test_misshaped_official_file(tmp_path):
    state = build_model("tiny", seed=1).state_dict()
    state["image_encoder.blocks.0.mlp.lin2.weight"] = torch.zeros(192, 700)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"odd.pth: .*mis-shaped keys: image_encoder"):
        load_checkpoint(str(path))


def test_unsupported_format_version(tmp_path, tiny_model):
    path = tmp_path / "future.pt"
    save_checkpoint(tiny_model, str(path))
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
        load_checkpoint(str(path))
