"""Quantized base checkpoints: the INT8 / INT4 weight format both sides share, and its reference math.

`training export --format int8|int4` writes one; `server serve --base DIR` loads it without quantizing
again; `server serve --quant int8|int4` on a full-precision base runs the same `quantize_model` in
memory. The format is device-neutral (no kernel's packed layout is ever written); each runtime repacks
at load. Everything the loader needs is in `quantization.json`: nothing is guessed from a file name.

Per weight matrix w [N, K] (N outputs, K inputs), per group of `group_size` inputs along K:

    int8          w ~= qweight * scales + mins   q uint8 [N, K] in [0, 255], scales / mins fp32 [N, K / group_size]
    int4          w ~= q * scales + mins         q in [0, 15], stored two per byte: qweight uint8 [N, K / 2],
                                                 the even k in the low nibble, the odd k in the high one
    int8_channel  w ~= qweight * scales[:, None] qweight int8 [N, K] in [-127, 127], scales fp32 [N]
                                                 (symmetric, one scale per output row: for shapes that do
                                                 not divide into the group kernels' blocks)

Why groups for int8 too: on smollm2-135m, one scale per output row (absmax) moved greedy next-token
agreement with fp32 to 0.964 over 1,016 tokens of held-out text (linears alone 0.972, the tied
embedding and head alone 0.980); 8-bit groups of 32 keep every group's own range. int4 picks, per group,
the clipping of its [min, max] range (from CLIP_CANDIDATES) with the smallest squared error: plain
min/max rounding lets one outlier coarsen the other 31 values of its group (for int8 no clipping won).

The input embedding is held int8 in both modes, and a head tied to it reads the same int8 table: in
SmolLM2 that table is a fifth of all weights, and an int4 head cost more agreement than it saved bytes. A classification head (`classifier`, `score`) stays unquantized: it is
a few thousand trained values, read by name from the folder. A linear whose shape does not divide into int4 groups
(K % group_size, or N % INT4_ROW_MULTIPLE, the row blocks the CPU kernels pack) is held int8_channel.
Norms, biases and other small tensors stay in the checkpoint's dtype.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.dense import HEAD_MODULES
from adapters.errors import AdapterFormatError
from adapters.json_file import read_json_object

QUANT_CONFIG_FILE = "quantization.json"
QUANT_WEIGHTS_FILE = "quantized.safetensors"
QUANT_FORMAT_VERSION = 1
QUANT_METHODS = ("int8", "int4")  # what a base is asked to be
MODULE_KINDS = ("int8", "int4", "int8_channel")  # what each matrix is held as
DEFAULT_GROUP_SIZE = 32
# int8 groups twice as long: its two packed halves each carry (scale, zero), and at 32 that made 1.25
# bytes a weight (0.31x of fp32); at 64, 1.125
GROUP_SIZES = {"int8": 64, "int4": DEFAULT_GROUP_SIZE}
INT4_ROW_MULTIPLE = 64  # output rows of an int4 matrix: a multiple of every CPU kernel's row block
INT8_MAX = 127
INT8_LEVELS = 255
INT4_LEVELS = 15
MIN_SCALE = 1e-10  # an all-zero row or group: any positive scale represents it exactly
CLIP_CANDIDATES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # int4: fractions of a group's range tried


@dataclass(frozen=True)
class QuantConfig:
    """quantization.json: how every quantized tensor of the checkpoint was made."""

    method: str  # "int8" | "int4": what the linears were asked to be
    group_size: int = DEFAULT_GROUP_SIZE  # groups along K of every group-wise matrix in the checkpoint
    modules: dict[str, str] = field(default_factory=dict)  # linear or embedding name -> one of MODULE_KINDS
    tied: dict[str, str] = field(default_factory=dict)  # head name -> the embedding whose table it reads
    source_name: str = ""  # the base that was quantized (a name or folder)
    source_fingerprint: str = ""  # its fingerprint: adapters trained on that base validate against it
    merged_adapter: str = ""  # the adapter merged in before quantizing ("" for a base-only export)
    dtype: str = "float32"  # of the tensors kept unquantized
    format_version: int = QUANT_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise AdapterFormatError(f"{QUANT_CONFIG_FILE}: method must be one of {QUANT_METHODS}, got {self.method!r}")
        if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 2:
            raise AdapterFormatError(f"{QUANT_CONFIG_FILE}: group_size must be a positive even integer")
        bad = {k: v for k, v in self.modules.items() if v not in MODULE_KINDS}
        if bad:
            raise AdapterFormatError(f"{QUANT_CONFIG_FILE}: unknown quantization of {sorted(bad)}")
        if self.format_version > QUANT_FORMAT_VERSION:
            raise AdapterFormatError(f"{QUANT_CONFIG_FILE} has format_version {self.format_version}; this "
                                     f"loraplex reads up to {QUANT_FORMAT_VERSION}: upgrade it")


def read_quant_config(folder: Path) -> QuantConfig | None:
    """The folder's quantization settings, or None for a full-precision folder."""
    path = Path(folder) / QUANT_CONFIG_FILE
    if not path.is_file():
        return None
    raw = read_json_object(path)
    known = set(QuantConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise AdapterFormatError(f"{QUANT_CONFIG_FILE}: unknown fields {unknown}")
    try:
        return QuantConfig(**raw)
    except TypeError as exc:
        raise AdapterFormatError(f"{QUANT_CONFIG_FILE}: {exc}") from exc


def write_quant_config(folder: Path, config: QuantConfig) -> None:
    (Path(folder) / QUANT_CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2, sort_keys=True) + "\n")


# --- one matrix ------------------------------------------------------------------------------------

def quantize_int8_channel(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """w [N, K] -> {qweight int8 [N, K], scales fp32 [N]}: symmetric, one scale per output row."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=MIN_SCALE) / INT8_MAX
    qweight = torch.round(w / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return {"qweight": qweight, "scales": scales}


def quantize_int8(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """w [N, K] -> {qweight uint8 [N, K], scales, mins fp32 [N, K/group]}, w ~= q * scale + min per group."""
    q, scale, low = _groups(weight, group_size, INT8_LEVELS, (1.0,))
    return {"qweight": q, "scales": scale, "mins": low}


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """w [N, K] -> {qweight uint8 [N, K/2], scales, mins fp32 [N, K/group]}, w ~= q * scale + min per group."""
    q, scale, low = _groups(weight, group_size, INT4_LEVELS, CLIP_CANDIDATES)
    return {"qweight": q[:, 0::2] | (q[:, 1::2] << 4), "scales": scale, "mins": low}


def _groups(weight: torch.Tensor, group_size: int, levels: int,
            clips: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization per group along K: (q uint8 [N, K] in [0, levels], scales, mins [N, K/group]),
    each group's range clipped by the candidate with the smallest squared error."""
    w = weight.detach().float()
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"{cols} inputs do not divide into groups of {group_size}")
    groups = w.reshape(rows, cols // group_size, group_size)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    best_err = best_q = best_scale = best_min = None
    for clip in clips:  # shrink the range around its centre; keep the best per group
        centre, half = (high + low) / 2, (high - low) * clip / 2
        g_min = centre - half
        scale = (2 * half / levels).clamp(min=MIN_SCALE)
        q = torch.round((groups - g_min) / scale).clamp(0, levels)
        err = (q * scale + g_min - groups).pow(2).sum(dim=-1, keepdim=True)
        if best_err is None:
            best_err, best_q, best_scale, best_min = err, q, scale, g_min
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q = torch.where(better, q, best_q)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, g_min, best_min)
    return best_q.reshape(rows, cols).to(torch.uint8), best_scale.squeeze(-1), best_min.squeeze(-1)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] (two values a byte) -> uint8 [N, K] in [0, 15]."""
    rows, half = qweight.shape
    return torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(rows, 2 * half)


def dequantize(kind: str, tensors: dict[str, torch.Tensor], group_size: int = DEFAULT_GROUP_SIZE) -> torch.Tensor:
    """The fp32 matrix a quantized one stands for: the reference every kernel is tested against."""
    if kind == "int8_channel":
        return tensors["qweight"].float() * tensors["scales"].float()[:, None]
    if kind in ("int8", "int4"):
        q = (unpack_int4(tensors["qweight"]) if kind == "int4" else tensors["qweight"]).float()
        rows, cols = q.shape
        groups = q.reshape(rows, cols // group_size, group_size)
        w = groups * tensors["scales"].float()[..., None] + tensors["mins"].float()[..., None]
        return w.reshape(rows, cols)
    raise ValueError(f"unknown quantization {kind!r}")


def groups_fit(shape: tuple[int, int], group_size: int) -> bool:
    """Whether a matrix divides into groups along K and into the group kernels' row blocks."""
    rows, cols = shape
    return cols % group_size == 0 and rows % INT4_ROW_MULTIPLE == 0


def quantize_matrix(kind: str, weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    if kind == "int8_channel":
        return quantize_int8_channel(weight)
    return (quantize_int8 if kind == "int8" else quantize_int4)(weight, group_size)


PARTS = {"int8": ("qweight", "scales", "mins"), "int4": ("qweight", "scales", "mins"),
         "int8_channel": ("qweight", "scales")}


# --- a whole model -------------------------------------------------------------------------------

@dataclass
class QuantizedWeights:
    """A model's quantized matrices (module name -> its tensors) and the settings that made them."""

    config: QuantConfig
    tensors: dict[str, dict[str, torch.Tensor]]  # module -> {"qweight", "scales"[, "mins"]}


def plan_model(model: nn.Module, method: str, group_size: int) -> tuple[dict[str, str], dict[str, str]]:
    """Which module gets which quantization, and which heads are tied to the input embedding."""
    if method not in QUANT_METHODS:
        raise ValueError(f"quantization must be one of {QUANT_METHODS}, got {method!r}")
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(module): name for name, module in model.named_modules()}
    modules: dict[str, str] = {}
    tied: dict[str, str] = {}
    if isinstance(embedding, nn.Embedding):
        fits = groups_fit(tuple(embedding.weight.shape), group_size)
        modules[names[id(embedding)]] = "int8" if fits else "int8_channel"
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.split(".", 1)[0] in HEAD_MODULES:
            continue
        if module is head and isinstance(embedding, nn.Embedding) and module.weight is embedding.weight:
            tied[name] = names[id(embedding)]
            continue
        if not groups_fit(tuple(module.weight.shape), group_size):
            modules[name] = "int8_channel"
        else:
            modules[name] = method
    return modules, tied


def quantize_model(model: nn.Module, method: str, group_size: int | None = None, **source: str) -> QuantizedWeights:
    """Quantize every linear layer and the input embedding of `model` (left unchanged); `group_size`
    defaults to the method's (GROUP_SIZES)."""
    if method not in QUANT_METHODS:
        raise ValueError(f"quantization must be one of {QUANT_METHODS}, got {method!r}")
    group_size = group_size or GROUP_SIZES[method]
    modules, tied = plan_model(model, method, group_size)
    tensors = {}
    for name, kind in modules.items():
        tensors[name] = quantize_matrix(kind, model.get_submodule(name).weight, group_size)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config = QuantConfig(method=method, group_size=group_size, modules=modules, tied=tied, dtype=dtype, **source)
    return QuantizedWeights(config, tensors)


def quantized_parameter_names(config: QuantConfig) -> set[str]:
    """State-dict keys the quantized tensors stand for (left out of the plain part of a checkpoint)."""
    return {f"{name}.weight" for name in (*config.modules, *config.tied)}


def save_quantized(folder: Path, model: nn.Module, weights: QuantizedWeights) -> None:
    """Write `quantized.safetensors` (quantized tensors as `<module>.<part>`, every other parameter and
    buffer of the model under its state-dict key) and `quantization.json` into `folder`."""
    from safetensors.torch import save_file

    skip = quantized_parameter_names(weights.config)
    flat = {key: value.detach().contiguous() for key, value in model.state_dict().items() if key not in skip}
    for module, parts in weights.tensors.items():
        for part, value in parts.items():
            flat[f"{module}.{part}"] = value.contiguous()
    save_file(flat, str(Path(folder) / QUANT_WEIGHTS_FILE), metadata={"format": "pt", "loraplex_quantized": "1"})
    write_quant_config(folder, weights.config)


def load_quantized(folder: Path) -> tuple[QuantConfig, dict[str, torch.Tensor], QuantizedWeights]:
    """(settings, the plain state dict, the quantized matrices) of a quantized folder."""
    from safetensors.torch import load_file

    config = read_quant_config(folder)
    if config is None:
        raise AdapterFormatError(f"{folder} has no {QUANT_CONFIG_FILE}: not a quantized checkpoint")
    path = Path(folder) / QUANT_WEIGHTS_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{folder} has {QUANT_CONFIG_FILE} but no {QUANT_WEIGHTS_FILE}")
    flat = load_file(str(path))
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for module, kind in config.modules.items():
        parts = PARTS[kind]
        missing = [p for p in parts if f"{module}.{p}" not in flat]
        if missing:
            raise AdapterFormatError(f"{QUANT_WEIGHTS_FILE} lacks {module}.{missing[0]} that {QUANT_CONFIG_FILE} promises")
        tensors[module] = {p: flat.pop(f"{module}.{p}") for p in parts}
    return config, flat, QuantizedWeights(config, tensors)


def dequantized_state_dict(weights: QuantizedWeights) -> dict[str, Any]:
    """`<module>.weight` -> the fp32 matrix it stands for, tied heads included (the reference model)."""
    config = weights.config
    out = {f"{name}.weight": dequantize(config.modules[name], parts, config.group_size)
           for name, parts in weights.tensors.items()}
    for head, embedding in config.tied.items():
        out[f"{head}.weight"] = out[f"{embedding}.weight"]
    return out


def weight_bytes(tensors: dict[str, dict[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for parts in tensors.values() for t in parts.values())
