"""The one image reader and validator (``storage.images``) and folder ingest: every bad-image
kind named by its reason, conversions that keep the pixels, and ingest that lets no image into
the images table that a stage would refuse."""

from __future__ import annotations

import datetime as dt
import io
import struct
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from maskmill.storage import Catalog, Store, ingest_folder
from maskmill.storage.images import (
    BadImageError,
    ImageInfo,
    MissingImageError,
    images_table,
    load_image,
    load_image_and_id,
    load_stored_image,
    read_image_info,
)
from maskmill.storage.ingest import INGEST_ROUND, INGEST_STAGE
from tests.test_storage_data import STORE_KINDS, empty_store


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


def test_load_image_and_id_keys_only_pixels_on_the_stored_grid(image_files):
    """The id (the one ingest gives) comes with an image its EXIF turn left as stored; a
    turned image is upright and has no id (what is keyed by the id is on the stored grid)."""
    image, image_id = load_image_and_id(image_files["rgb"])
    np.testing.assert_array_equal(image, load_image(image_files["rgb"]))
    assert image_id == read_image_info(image_files["rgb"]).image_id
    turned, no_id = load_image_and_id(image_files["exif_rotated"])
    np.testing.assert_array_equal(turned, load_image(image_files["exif_rotated"]))
    assert turned.shape == (40, 32, 3) and no_id is None


# ------------------------------------------------------------------------- the images table row


def test_read_image_info_is_height_then_width_and_content_addressed(image_files):
    info = read_image_info(image_files["rgb"])
    assert (info.height, info.width) == (32, 40)
    again = read_image_info(image_files["rgb"])
    assert info == again and len(info.image_id) == 16 and info.sha256.startswith(info.image_id)
    assert info.image_id != read_image_info(image_files["grey"]).image_id
    # EXIF rotation is not applied: the table keeps the stored grid
    rotated = read_image_info(image_files["exif_rotated"])
    assert (rotated.height, rotated.width) == (32, 40)
    table = images_table([info, rotated], added_at=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc))
    assert table.column("height").to_pylist() == [32, 32]
    assert table.column("width").to_pylist() == [40, 40]


@pytest.mark.parametrize("kind,reason", sorted(BAD.items()))
def test_read_image_info_refuses_what_a_stage_would(image_files, kind, reason):
    """Validated once, at ingest: the same reason and text as reading the image in a stage."""
    with pytest.raises(BadImageError) as at_ingest:
        read_image_info(image_files[kind])
    with pytest.raises(BadImageError) as in_stage:
        load_image(image_files[kind], exif_transpose=False)
    assert at_ingest.value.reason == reason
    assert str(at_ingest.value) == str(in_stage.value)


def test_missing_file_is_a_missing_image_error(tmp_path):
    with pytest.raises(MissingImageError) as caught:
        read_image_info(str(tmp_path / "gone.png"))
    assert caught.value.reason == "missing" and isinstance(caught.value, FileNotFoundError)
    assert str(caught.value) == f"{tmp_path / 'gone.png'}: missing: image file not found"


def test_stored_image_that_changed_size_is_named(image_files):
    info = read_image_info(image_files["rgb"])
    assert load_stored_image(info).shape == (32, 40, 3)
    moved = ImageInfo(
        image_id=info.image_id, uri=image_files["grey"], height=40, width=32, sha256=info.sha256
    )
    with pytest.raises(BadImageError) as caught:
        load_stored_image(moved)
    assert caught.value.reason == "size_changed"
    assert "decodes to 40x32 (w x h) but the images table says 32x40" in str(caught.value)


def test_bad_image_error_survives_pickling():
    """Errors cross process boundaries (Ray workers, Prefect): their fields must survive."""
    import pickle

    for error in (BadImageError("/x.png", "truncated", "cut short"), MissingImageError("/y")):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)
        assert (back.uri, back.reason) == (error.uri, error.reason)


# ------------------------------------------------------------------------------ folder ingest


@pytest.fixture(params=STORE_KINDS)
def store(request, tmp_path) -> Iterator[Store]:
    yield from empty_store(request.param, tmp_path)


def test_ingest_records_bad_files_as_failures_and_never_as_images(tmp_path, store):
    folder = tmp_path / "kinds"
    paths = make_image_files(folder)
    summary = ingest_folder(store, str(folder))
    assert summary == {"images": len(GOOD), "failures": len(BAD)}
    with Catalog(store) as catalog:
        registered = dict(catalog.con.execute("SELECT uri, (height, width) FROM images").fetchall())
        failures = catalog.con.execute(
            "SELECT uri, round, stage, error FROM failures ORDER BY uri"
        ).fetchall()
    assert set(registered) == {paths[k] for k in GOOD}
    assert set(registered.values()) == {(32, 40)}
    assert {uri for uri, *_ in failures} == {paths[k] for k in BAD}
    for uri, round_, stage, error in failures:
        assert (round_, stage) == (INGEST_ROUND, INGEST_STAGE)
        with pytest.raises(BadImageError) as in_stage:  # the text a stage would write
            load_image(uri, exif_transpose=False)
        assert error == str(in_stage.value)
    by_uri = {uri: error for uri, _, _, error in failures}
    assert f"{paths['truncated']}: truncated: " in by_uri[paths["truncated"]]
    assert f"{paths['one_pixel']}: too_small: 1x1 pixels" in by_uri[paths["one_pixel"]]
    # the same folder again: its shard is found and nothing is read or written
    assert ingest_folder(store, str(folder)) == {"skipped": 1}
    assert len(store.shards("images")) == 1 and len(store.shards("failures")) == 1


def test_ingest_of_only_bad_files_writes_no_images(tmp_path, store):
    folder = tmp_path / "bad"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    jpeg = _jpeg(rgb)
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # the header is whole
    (folder / "dot.png").write_bytes(_png(rgb[:1, :1]))
    assert ingest_folder(store, str(folder)) == {"images": 0, "failures": 2}
    assert store.read_table("images").num_rows == 0
    errors = sorted(store.read_table("failures").column("error").to_pylist())
    assert [e.split(": ")[1] for e in errors] == ["too_small", "truncated"]


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_ingest_refuses_an_empty_folder(tmp_path, store):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        ingest_folder(store, str(tmp_path / "empty"))
    assert store.shards("images") == [] and store.shards("failures") == []
