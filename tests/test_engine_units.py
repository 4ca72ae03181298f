"""Data engine pieces without Prefect or Ray: image loading of every bad-image kind, the
simulated annotator's clicks and decisions, the plan's split."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from maskmill.engine.annotators import SimulatedAnnotator, iou_matrix
from maskmill.engine.images import BadImageError, load_image
from maskmill.storage import rle

# ------------------------------------------------------------------------------------- images


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return buffer.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but that holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00"))
        + chunk(b"IEND", b"")
    )


def make_image_files(folder) -> dict[str, str]:
    """One file per image kind of the issue; returns kind -> path. Good images are 40 x 32."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    files: dict[str, bytes] = {}
    files["rgb.png"] = _png(rgb)
    files["grey.png"] = _png(rgb[..., 0])
    grey16 = (np.arange(32 * 40, dtype=np.uint32).reshape(32, 40) * 51).astype(np.uint16)
    files["grey16.png"] = _png(grey16)  # Pillow stores uint16 as mode I;16
    rgba = np.dstack([rgb, np.full((32, 40), 255, np.uint8)])
    rgba[:, :20, 3] = 0  # left half transparent
    files["rgba.png"] = _png(rgba)
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, "JPEG", quality=95)
    files["cmyk.jpg"] = buffer.getvalue()
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.fromarray(rgb).save(buffer, "JPEG", exif=exif.tobytes())
    files["exif_rotated.jpg"] = buffer.getvalue()
    buffer = io.BytesIO()
    frames = [Image.new("RGB", (40, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    files["animated.gif"] = buffer.getvalue()
    files["png_named.jpg"] = _png(rgb[::-1].copy())  # wrong extension (other content)
    files["truncated.png"] = _png(rgb)[:-200]
    files["empty.png"] = b""
    files["one_pixel.png"] = _png(rgb[:1, :1])
    files["not_an_image.jpg"] = b"this is a text file, not a JPEG\n" * 4
    files["bomb.png"] = _bomb_png(30000, 30000)
    paths = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths[name.split(".")[0]] = str(folder / name)
    return paths


GOOD = ("rgb", "grey", "grey16", "rgba", "cmyk", "exif_rotated", "animated", "png_named")
BAD = {
    "truncated": "truncated",
    "empty": "empty",
    "one_pixel": "too_small",
    "not_an_image": "not_an_image",
    "bomb": "decompression_bomb",
}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    return make_image_files(tmp_path_factory.mktemp("kinds"))


@pytest.mark.parametrize("kind", GOOD)
def test_good_kinds_load_as_rgb_on_the_stored_grid(image_files, kind):
    image = load_image(image_files[kind], exif_transpose=False)
    assert image.dtype == np.uint8 and image.shape == (32, 40, 3)
    assert image.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("kind,reason", sorted(BAD.items()))
def test_bad_kinds_name_their_reason(image_files, kind, reason):
    with pytest.raises(BadImageError) as caught:
        load_image(image_files[kind])
    assert caught.value.reason == reason
    assert image_files[kind] in str(caught.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(BadImageError, match="missing") as caught:
        load_image(str(tmp_path / "nope.png"))
    assert caught.value.reason == "missing"


def test_conversions_keep_the_pixels(image_files):
    rgb = load_image(image_files["rgb"])
    # grey -> three equal channels; 16 bit scaled (x / 257), not clipped to white
    grey16 = load_image(image_files["grey16"])
    expected = np.rint((np.arange(32 * 40).reshape(32, 40) * 51 % 65536) / 257.0)
    np.testing.assert_array_equal(grey16[..., 0], expected.astype(np.uint8))
    assert (grey16[..., 0] == grey16[..., 2]).all()
    # RGBA: transparent half over white, opaque half as it is
    rgba = load_image(image_files["rgba"])
    assert (rgba[:, :20] == 255).all()
    np.testing.assert_array_equal(rgba[:, 20:], rgb[:, 20:])
    # animated: the first frame (red)
    animated = load_image(image_files["animated"])
    assert tuple(animated[0, 0]) == (255, 0, 0)
    # CMYK JPEG: close to the RGB it came from
    assert np.abs(load_image(image_files["cmyk"]).astype(int) - rgb).mean() < 12
    np.testing.assert_array_equal(load_image(image_files["png_named"]), rgb[::-1])


def test_exif_rotation_applied_only_when_asked(image_files):
    stored = load_image(image_files["exif_rotated"], exif_transpose=False)
    upright = load_image(image_files["exif_rotated"], exif_transpose=True)
    assert stored.shape == (32, 40, 3) and upright.shape == (40, 32, 3)
    # orientation 6: the upright image is the stored one turned 90 degrees clockwise
    np.testing.assert_array_equal(upright, np.rot90(stored, k=-1))


# ---------------------------------------------------------------------------------- annotator


class OraclePredictor:
    """Returns, for any clicks, the ground-truth object under the first positive click (a
    perfect model), or an empty mask (a useless one) with ``useless=True``; records clicks."""

    def __init__(self, objects: list[np.ndarray], useless: bool = False) -> None:
        self.objects, self.useless, self.calls = objects, useless, []

    def predict(self, point_coords, point_labels, mask_input=None, multimask_output=True):
        self.calls.append((np.array(point_coords), np.array(point_labels), mask_input))
        x, y = point_coords[0]
        shape = self.objects[0].shape
        mask = np.zeros(shape, bool)
        if not self.useless:
            for obj in self.objects:
                if obj[int(y), int(x)]:
                    mask = obj
        n = 3 if multimask_output else 1
        masks = np.stack([mask] * n)
        return masks, np.linspace(0.9, 0.5, n), np.zeros((n, 256, 256), np.float32)


def _objects() -> list[np.ndarray]:
    big = np.zeros((64, 80), bool)
    big[5:45, 5:45] = True
    small = np.zeros((64, 80), bool)
    small[50:60, 60:75] = True
    medium = np.zeros((64, 80), bool)
    medium[10:30, 55:78] = True
    return [small, big, medium]


def test_annotator_takes_largest_first_and_clicks_the_centre():
    objects = _objects()
    annotator = SimulatedAnnotator(lambda _: [rle.encode(o) for o in objects])
    predictor = OraclePredictor(objects)
    image = np.zeros((64, 80, 3), np.uint8)
    result = annotator.annotate("img", image, predictor, existing=[])
    assert len(result.masks) == 3 and result.abandoned == 0
    drawn = [rle.decode(m.segmentation) for m in result.masks]
    # largest (big, 1600 px), then medium (460), then small (150)
    for mask, expected in zip(drawn, [objects[1], objects[2], objects[0]], strict=True):
        np.testing.assert_array_equal(mask, expected)
    # one click each, at the point farthest from the boundary: the square's centre
    assert [len(m.clicks) for m in result.masks] == [1, 1, 1]
    x, y, label = result.masks[0].clicks[0]
    assert label == 1 and 24 <= x <= 25 and 24 <= y <= 25
    assert result.masks[0].seconds == pytest.approx(3.0 + 1.5)


def test_annotator_skips_covered_objects():
    objects = _objects()
    annotator = SimulatedAnnotator(lambda _: [rle.encode(o) for o in objects])
    covering = objects[1].copy()
    covering[5:10] = False  # IoU 0.875 with the big object: covered
    result = annotator.annotate(
        "img", np.zeros((64, 80, 3), np.uint8), OraclePredictor(objects), [rle.encode(covering)]
    )
    assert len(result.masks) == 2
    assert iou_matrix([m.segmentation for m in result.masks], [rle.encode(objects[1])]).max() < 0.5


def test_annotator_gives_up_after_max_clicks():
    objects = _objects()[:1]
    annotator = SimulatedAnnotator(lambda _: [rle.encode(o) for o in objects], max_clicks=20)
    predictor = OraclePredictor(objects, useless=True)
    result = annotator.annotate("img", np.zeros((64, 80, 3), np.uint8), predictor, [])
    assert result.masks == [] and result.abandoned == 1
    assert result.abandoned_clicks == 20 and len(predictor.calls) == 20
    # after the first call every call refines: all clicks so far and the previous logits
    coords, labels, mask_input = predictor.calls[-1]
    assert coords.shape == (20, 2) and mask_input is not None
    # the prediction is empty, so every corrective click is a positive one inside the object
    assert (labels == 1).all()
    assert all(objects[0][int(y), int(x)] for x, y in coords)


def test_annotator_checks_ground_truth_size():
    objects = _objects()
    annotator = SimulatedAnnotator(lambda _: [rle.encode(o) for o in objects])
    with pytest.raises(ValueError, match="ground-truth mask 0 is 64x80"):
        annotator.annotate("img", np.zeros((10, 10, 3), np.uint8), OraclePredictor(objects), [])


def test_iou_matrix_by_pycocotools():
    a, b = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    a[:5], b[:, :5] = True, True
    assert iou_matrix([rle.encode(a)], [rle.encode(b), rle.encode(a)]).tolist() == [
        [pytest.approx(25 / 75), 1.0]
    ]
