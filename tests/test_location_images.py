"""Per-location images (folder, image column, context rasters) and their frozen image features (M3ob)."""

from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from dataset_builders.location_images import (
    GROUP_PALETTE,
    OTHER_COLOUR,
    ImageReadError,
    context_rasters,
    find_image_column,
    image_file_stem,
    location_images,
    read_image_column,
    read_image_folder,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDS = ["v1", "v2", "a/b c", "v4", "v5"]


def _png(colour, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _locations() -> pd.DataFrame:
    return pd.DataFrame({
        "location_id": IDS,
        "latitude": [40.70, 40.701, 40.702, 40.75, 40.80],
        "longitude": [-74.00, -74.001, -74.0, -73.95, -73.90],
        "category": ["Food > Coffee Shop", "Food > Bakery", "Shops > Mall", "Office", None],
    })


@pytest.fixture
def image_dir(tmp_path):
    """Images for v1 (.png), v2 (.JPG), "a/b c" (percent-encoded name) and v5 (not an image); none for v4."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "v1.png").write_bytes(_png((255, 0, 0)))
    Image.new("RGB", (20, 12), (0, 255, 0)).save(folder / "v2.JPG", format="JPEG")
    (folder / f"{image_file_stem('a/b c')}.png").write_bytes(_png((0, 0, 255)))
    (folder / "v5.png").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("ignored")
    return folder


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    from train.convert_dinov2 import dinov2_small_image_processor

    folder = tmp_path_factory.mktemp("tiny_dinov2")
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=8, image_size=32)
    Dinov2Model(config).save_pretrained(folder)
    dinov2_small_image_processor().save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------------------------
# Image sources
# --------------------------------------------------------------------------------------------------------------------


def test_image_file_stem():
    assert image_file_stem("4a60ba17d1f05c08c118d7ce") == "4a60ba17d1f05c08c118d7ce"
    assert image_file_stem("a.b-c_d") == "a.b-c_d"
    assert image_file_stem("a/b c") == "a%2Fb%20c"
    assert image_file_stem(".hidden") == "%2Ehidden"
    assert image_file_stem("100%") == "100%25"


def test_read_image_folder_counts_missing_and_names_unreadable(image_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="dataset_builders.location_images"):
        imgs = read_image_folder(_locations(), image_dir)
    assert imgs.source == "folder"
    assert imgs.present.tolist() == [True, True, True, False, False]
    assert imgs.missing == {"no_file": 1, "unreadable": 1}
    assert "v4" in caplog.text and str(image_dir / "v5.png") in caplog.text
    assert imgs.image(0).getpixel((0, 0)) == (255, 0, 0)
    assert imgs.image(1).size == (20, 12)  # upper-case extension found
    assert imgs.image(2).getpixel((3, 3)) == (0, 0, 255)  # percent-encoded name of an awkward id
    desc = imgs.describe()
    assert desc["num_with_image"] == 3 and desc["num_without_image"] == 2

    with pytest.raises(ImageReadError, match="v5.png"):
        read_image_folder(_locations(), image_dir, on_error="raise")
    with pytest.raises(NotADirectoryError, match="nowhere"):
        read_image_folder(_locations(), image_dir / "nowhere")


def test_synthetic_land_use_tiles_read_as_folder(tmp_path):
    from dataset_builders.synthetic import synthesize_checkins

    city = synthesize_checkins(num_users=2, num_locations=30, num_days=2, seed=0)
    folder = city.write_land_use_tiles(tmp_path, size=16)
    imgs = read_image_folder(city.pois, folder)
    assert imgs.present.all() and imgs.missing == {}
    np.testing.assert_array_equal(np.asarray(imgs.image(3)), city.land_use_tiles(size=16)[3])


def test_image_column_datasets_image_feature(tmp_path):
    import datasets
    import pyarrow.parquet as pq

    (tmp_path / "pics").mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "pics" / "v3.png")
    ds = datasets.Dataset.from_dict({
        "location_id": ["v1", "v2", "v3", "v4"],
        "image": [Image.new("RGB", (8, 8), (200, 10, 10)), None, None, None],
    }).cast_column("image", datasets.Image())
    ds.to_parquet(tmp_path / "locations.parquet")
    table = pq.read_table(tmp_path / "locations.parquet")
    assert find_image_column(table) == "image"
    # a relative path (resolved against base_dir), and bytes that are no image
    rows = table.to_pylist()
    rows[2]["image"] = {"bytes": None, "path": "pics/v3.png"}
    rows[3]["image"] = {"bytes": b"garbage", "path": None}
    table = pa.Table.from_pylist(rows, schema=table.schema)
    imgs = read_image_column(table, base_dir=tmp_path)
    assert imgs.present.tolist() == [True, False, True, False]
    assert imgs.missing == {"null": 1, "unreadable": 1}
    assert imgs.image(0).getpixel((0, 0)) == (200, 10, 10)
    assert imgs.image(2).getpixel((0, 0)) == (9, 9, 9)
    with pytest.raises(ImageReadError, match="column 'image', row 3"):
        read_image_column(table, "image", base_dir=tmp_path, on_error="raise")
    # source precedence: a folder beats the column, the column beats context rasters
    assert location_images(table).source == "column"
    assert location_images(table.drop(["image"]).append_column("latitude", pa.array([40.7] * 4)).append_column(
        "longitude", pa.array([-74.0] * 4))).source == "context_raster"


# --------------------------------------------------------------------------------------------------------------------
# Context rasters
# --------------------------------------------------------------------------------------------------------------------


def _ring_city() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Location "x" surrounded by 40 Food POIs within 250 m; 5 Shops POIs far away; an isolated location "y"."""
    rng = np.random.default_rng(0)
    n = 40
    ang = rng.uniform(0, 2 * np.pi, n)
    r = rng.uniform(60, 250, n) / 111_000
    food = pd.DataFrame({"latitude": 40.7 + r * np.sin(ang), "longitude": -74.0 + r * np.cos(ang) / np.cos(0.71),
                         "category": "Coffee Shop", "category_group": "Food"})
    shops = pd.DataFrame({"latitude": 40.75 + np.arange(5) * 1e-4, "longitude": [-74.0] * 5, "category": "Mall",
                          "category_group": "Shops"})
    pois = pd.concat([food, shops], ignore_index=True)
    locations = pd.DataFrame({"location_id": ["x", "y"], "latitude": [40.7, 41.5], "longitude": [-74.0, -74.0],
                              "category": ["Bakery", "Mall"], "category_group": ["Food", "Shops"]})
    return locations, pois


def test_context_raster_shape_determinism_marker_and_dominant_colour():
    locations, pois = _ring_city()
    r = context_rasters(locations, pois, size=32, radius_m=400)
    assert r.images.shape == (2, 32, 32, 3) and r.images.dtype == np.uint8
    assert r.groups == ["Food", "Shops"]  # by frequency
    np.testing.assert_array_equal(r.images, context_rasters(locations, pois, size=32, radius_m=400).images)

    food, shops = np.array(GROUP_PALETTE[0]), np.array(GROUP_PALETTE[1])
    marker, c0 = 2, 15  # max(2, 32 // 16) pixels at (32 - 2) // 2
    for img, colour in zip(r.images, (food, shops)):
        np.testing.assert_array_equal(img[c0:c0 + marker, c0:c0 + marker], np.broadcast_to(colour, (2, 2, 3)))
        assert (img[c0 - 1, c0 - 1:c0 + marker + 1] == 255).all()  # white ring
        assert (img[c0 + marker, c0 - 1:c0 + marker + 1] == 255).all()

    # the Food-surrounded location: lit pixels are Food-coloured (hue of the palette colour, log brightness)
    img = r.images[0].astype(float)
    img[c0 - 1:c0 + marker + 1, c0 - 1:c0 + marker + 1] = 0
    lit = img.sum(axis=-1) > 30
    assert lit.sum() > 50
    mean = img[lit].mean(axis=0)
    cos = mean @ food / np.linalg.norm(mean) / np.linalg.norm(food)
    assert cos > 0.99 and cos > mean @ shops / np.linalg.norm(mean) / np.linalg.norm(shops) + 0.1
    # the isolated location: black ground but for its marker
    img = r.images[1].copy()
    img[c0 - 1:c0 + marker + 1, c0 - 1:c0 + marker + 1] = 0
    assert not img.any()

    # fixed groups keep colours across datasets; unknown groups are grey
    fixed = context_rasters(locations, pois, groups=["Shops"])
    assert fixed.groups == ["Shops"]
    np.testing.assert_array_equal(fixed.images[0, c0, c0], OTHER_COLOUR)
    with pytest.raises(ValueError, match="latitude"):
        context_rasters(locations.assign(latitude=[np.nan, 1.0]))


# --------------------------------------------------------------------------------------------------------------------
# Frozen image features
# --------------------------------------------------------------------------------------------------------------------


def test_features_missing_rows_cache_and_changed_image(image_dir, tiny_dinov2, tmp_path, monkeypatch):
    import torch
    from transformers import AutoImageProcessor, AutoModel

    import train.image_features as image_features
    from train.image_features import clear_encoder_pool, location_image_features

    cache = tmp_path / "cache"
    first = location_image_features(_locations(), images=image_dir, encoder=tiny_dinov2, image_size=32,
                                    cache_dir=cache, progress=False)
    assert first.features.shape == (5, 32) and first.features.dtype == np.float32 and first.dim == 32
    assert first.present.tolist() == [True, True, True, False, False]
    assert not first.features[~first.present].any() and np.abs(first.features[first.present]).sum(axis=1).min() > 0
    src = first.source
    assert src["image_source"] == "folder" and src["num_encoded"] == 3 and src["num_cached"] == 0
    assert src["missing"] == {"no_file": 1, "unreadable": 1} and src["image_size"] == 32
    assert src["pooling"] == "pooler_output" and src["model_type"] == "dinov2"

    # the features are the encoder's pooled output of the image resized to image_size
    model = AutoModel.from_pretrained(tiny_dinov2).eval()
    proc = AutoImageProcessor.from_pretrained(tiny_dinov2)
    pixels = proc([Image.open(image_dir / "v1.png").convert("RGB")], size={"shortest_edge": 32},
                  crop_size={"height": 32, "width": 32}, return_tensors="pt")["pixel_values"]
    assert pixels.shape[-1] == 32
    with torch.inference_mode():
        expected = model(pixel_values=pixels).pooler_output[0].numpy()
    np.testing.assert_allclose(first.features[0], expected, rtol=1e-4, atol=1e-5)

    # second call: everything from the cache, the encoder is not even loaded
    clear_encoder_pool()

    def no_load(*args, **kwargs):
        raise AssertionError("the encoder was loaded although every image is cached")

    monkeypatch.setattr(image_features, "_load_encoder", no_load)
    second = location_image_features(_locations(), images=image_dir, encoder=tiny_dinov2, image_size=32,
                                     cache_dir=cache, progress=False)
    np.testing.assert_array_equal(second.features, first.features)
    assert second.source["num_encoded"] == 0 and second.source["num_cached"] == 3
    monkeypatch.undo()

    # a changed image is encoded again, the others come from the cache
    (image_dir / "v1.png").write_bytes(_png((255, 255, 0)))
    third = location_image_features(_locations(), images=image_dir, encoder=tiny_dinov2, image_size=32,
                                    cache_dir=cache, progress=False)
    assert third.source["num_encoded"] == 1 and third.source["num_cached"] == 2
    assert not np.allclose(third.features[0], first.features[0])
    np.testing.assert_array_equal(third.features[1:], first.features[1:])


def test_features_of_context_rasters_and_tiny_clip(tiny_dinov2, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from train.image_features import location_image_features

    res = location_image_features(_locations(), encoder=tiny_dinov2, image_size=16, cache_dir=False,
                                  progress=False)
    assert res.source["image_source"] == "context_raster" and res.present.all() and res.features.shape == (5, 32)

    folder = tmp_path / "tiny_clip"
    config = CLIPConfig(
        text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                     "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                       "image_size": 32, "patch_size": 8},
        projection_dim=12,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    clip = location_image_features(_locations(), encoder=folder, image_size=48, cache_dir=tmp_path / "cache",
                                   progress=False)
    assert clip.features.shape == (5, 12) and clip.present.all()
    assert clip.source["pooling"] == "image_features" and clip.source["model_type"] == "clip"
    assert np.isfinite(clip.features).all()


def _png_broken_data() -> bytes:
    """A PNG whose structure and checksums are valid (it passes the cheap check) but whose pixel data do not decode."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"not zlib data") + chunk(b"IEND", b"")


def test_features_image_that_fails_to_decode(tiny_dinov2, tmp_path, caplog):
    from train.image_features import location_image_features

    folder = tmp_path / "images"
    folder.mkdir()
    for location_id in ("v1", "v4", "v5"):
        (folder / f"{location_id}.png").write_bytes(_png((10, 20, 30)))
    (folder / "v2.png").write_bytes(_png_broken_data())
    kwargs = {"images": folder, "encoder": tiny_dinov2, "image_size": 16, "cache_dir": tmp_path / "c", "progress": False}
    with caplog.at_level(logging.WARNING):
        res = location_image_features(_locations(), **kwargs)
    assert res.present.tolist() == [True, False, False, True, True]
    assert res.source["missing"] == {"no_file": 1, "unreadable": 1}
    assert res.source["num_unique_images"] == 2  # v1, v4 and v5 share one image, encoded once
    assert not res.features[1].any() and str(folder / "v2.png") in caplog.text
    np.testing.assert_array_equal(res.features[0], res.features[4])
    with pytest.raises(ImageReadError, match="v2.png"):
        location_image_features(_locations(), on_error="raise", **kwargs)
