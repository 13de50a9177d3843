"""INT8 quantization of an exported ONNX graph: int8 weights x int8 activations scaled per token.

Every MatMul whose right-hand side is an fp32 weight [K, N] is rewritten as

    x [..., K] -> x2 [M, K] -> s [M] = max(|x2|, over K) / 127         (one scale per token, at run time)
    xq = QuantizeLinear(x2, s, zero point 128, axis=0)                 (uint8; 128 +- 127)
    y2 = MatMulIntegerToFloat(xq, wq, 1, w_scale, 128)                 (onnxruntime's int8 GEMM, scaled by w_scale)
    y  = (y2 * s[:, None]) reshaped to [..., N]

with wq = round(w / w_scale), w_scale [N] = max(|w|, over K) / 63 (symmetric, 7 bits: see WEIGHT_MAX; one scale per output
channel), fixed at export time. MatMuls that share an input share its quantization (a layer's q, k and v).
Embedding lookups, layer norms, softmax, the attention score products (no constant weight) and Gemm
heads stay fp32. `reference_int8_matmul` is the same arithmetic in numpy, for the tests.

Why one activation scale per token: a row's scale then depends on that row alone, so a text's logits are
the same whatever it is batched or padded with, and a few tokens with large activations (BERT's [CLS] and
[SEP]) no longer coarsen every other token's steps. onnxruntime's own quantizers either scale the whole
batch tensor at once (`quantize_dynamic`) or run a kernel that is slow for these shapes on x86
(`MatMulNBitsQuantizer`). Measured on the minilm-l6 sentiment adapter, its 2,048 held-out rows, max
length 64, 2 threads (agreement: argmax equal to torch fp32's, batches of 32; speed: batch-32 requests/s
over ORT fp32's, engines interleaved in one process; README, "Export and serve with onnxruntime"):

    recipe                                              agreement                accuracy   vs ORT fp32
    (torch fp32)                                        1                        0.8052
    this one (per-token uint8 x per-channel int8)       0.9937 (any batching)    0.8047     1.8-1.9x
    quantize_dynamic, per-channel weights               0.9868 (0.9780 alone)    0.8037     1.7-1.8x
    quantize_dynamic, per-tensor weights                0.9541                   0.7993
    quantize_dynamic per-channel + SmoothQuant 0.5/0.7  0.9697 / 0.9814          0.7964 / 0.8042
    quantize_dynamic per-channel, FFN down-proj fp32    0.9868                   0.8066
    MatMulNBits 8-bit, block 128 / 32, accuracy_level 4 0.9951 / 0.9971          0.8081 / 0.8062  1.1x
    MatMulNBits 4-bit, block 32, accuracy_level 4       0.9731                   0.8027

uint8 activations with int8 weights are onnxruntime's fast path on x86 (an int8 x int8 GEMM measured
3x slower than fp32 here). On x86 CPUs without VNNI its u8 x s8 kernel can saturate pairs of products in
int16; the export's parity report is where that would show.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import TrainingError
from training.export.onnx_export import EXPORT_EXTRA_HINT, ExportToolsMissingError

INT8_BITS = 8
INT8_MAX = 127  # activations: uint8 in 128 +- 127
# Weights in [-63, 63] (7 bits): onnxruntime's u8 x s8 GEMM on x86 without VNNI (AVX2) sums pairs of
# products in int16, and 2 * 255 * 127 overflows it (the matmuls came out wrong by up to 10% on such a
# machine); 2 * 255 * 63 = 32,130 does not, so one graph computes the same on every x86 CPU.
WEIGHT_MAX = 63
ACTIVATION_ZERO_POINT = 128  # uint8 activations around 128: onnxruntime's fast u8 x s8 GEMM
MIN_SCALE = 1e-12  # an all-zero row or column gets this scale instead of 0 (its values quantize to 0 anyway)
MIN_OPSET = 13  # QuantizeLinear with one scale per row (axis=0)
REDUCE_AXES_AS_INPUT_OPSET = 18  # ReduceMax / ReduceMin take their axes as an input from opset 18
MS_DOMAIN = "com.microsoft"  # MatMulIntegerToFloat is an onnxruntime contrib op
METHOD = ("int8 MatMul: weights int8 per output channel (symmetric, at export), activations uint8 per token "
          "(symmetric around 128, at run time); onnxruntime QuantizeLinear + MatMulIntegerToFloat")


def quantize_int8(src: Path, dest: Path) -> dict[str, Any]:
    """Write the INT8 version of the ONNX graph `src` to `dest`; returns the settings for the manifest."""
    try:
        import onnx
    except ImportError as exc:
        raise ExportToolsMissingError(f"INT8 quantization needs onnx ({exc}); {EXPORT_EXTRA_HINT}") from exc
    model = onnx.load(str(src))
    rewritten = _Rewriter(model).run()
    if rewritten == 0:
        raise TrainingError(f"{src.name} has no MatMul with a constant fp32 weight to quantize")
    onnx.save_model(model, str(dest))
    return {"method": METHOD, "bits": INT8_BITS, "weights": "int8 holding 7 bits ([-63, 63]), symmetric, one scale per output channel",
            "activations": "uint8, symmetric around 128, one scale per token at run time",
            "op_types": ["MatMul"], "matmuls": rewritten}


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [K, N] fp32 -> (wq [K, N] int8, w_scale [N] fp32), symmetric, one scale per output channel."""
    scale = np.maximum(np.abs(w).max(axis=0), MIN_SCALE * WEIGHT_MAX) / WEIGHT_MAX
    wq = np.clip(np.round(w / scale), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8)
    return wq, scale.astype(np.float32)


def reference_int8_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The rewritten MatMul in plain numpy: x [..., K] fp32, w [K, N] fp32 -> [..., N] fp32."""
    wq, w_scale = quantize_weight(w)
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / INT8_MAX, MIN_SCALE)  # [..., 1]
    xq = np.clip(np.round(x / s), -INT8_MAX, INT8_MAX).astype(np.int64)  # centred: the zero point is taken off
    return ((xq @ wq.astype(np.int64)).astype(np.float64) * s * w_scale).astype(np.float32)


class _Rewriter:
    """Rewrites one ModelProto's top-level graph in place (see the module docstring for the subgraph)."""

    def __init__(self, model) -> None:
        from onnx import helper, numpy_helper

        self.model, self.graph = model, model.graph
        self.helper, self.numpy_helper = helper, numpy_helper
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if self.opset < MIN_OPSET:
            raise TrainingError(f"INT8 needs opset {MIN_OPSET} or newer (this graph: {self.opset}); "
                                f"export with --opset {MIN_OPSET} or more")
        self.weights = {i.name: i for i in self.graph.initializer}
        self.quantized: dict[str, tuple[str, str, str]] = {}  # weight name -> (wq, w_scale, N) initializer names

    def run(self) -> int:
        groups: dict[str, list] = collections.defaultdict(list)  # activation name -> its weight MatMuls
        for node in self.graph.node:
            if self._is_weight_matmul(node):
                groups[node.input[0]].append(node)
        if not groups:
            return 0
        self._add_constants()
        replacement = {}
        for index, (x, nodes) in enumerate(groups.items()):
            prefix = f"int8_{index}/"
            k = self.weights[nodes[0].input[1]].dims[0]
            replacement[id(nodes[0])] = self._quantize_activation(x, k, prefix)
            for j, node in enumerate(nodes):
                replacement[id(node)] = replacement.get(id(node), []) + self._int8_matmul(node, prefix, j)
        new_nodes = [n for node in self.graph.node for n in replacement.get(id(node), [node])]
        del self.graph.node[:]
        self.graph.node.extend(new_nodes)
        used = {name for node in new_nodes for name in node.input}
        kept = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)
        if not any(o.domain == MS_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(self.helper.make_opsetid(MS_DOMAIN, 1))
        return sum(len(nodes) for nodes in groups.values())

    def _is_weight_matmul(self, node) -> bool:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.input[1] not in self.weights:
            return False
        weight = self.weights[node.input[1]]
        return len(weight.dims) == 2 and weight.data_type == 1 and node.input[0] not in self.weights  # 1: FLOAT

    def _add_constants(self) -> None:
        const = self.numpy_helper.from_array
        self.graph.initializer.extend([
            const(np.array([1], np.int64), "int8/axis_1"),
            const(np.array([0], np.int64), "int8/start_0"),
            const(np.array([-1], np.int64), "int8/end_last"),
            const(np.array(1.0 / INT8_MAX, np.float32), "int8/inv_max"),
            const(np.array(MIN_SCALE, np.float32), "int8/min_scale"),
            const(np.array(1.0, np.float32), "int8/one"),
            const(np.array(ACTIVATION_ZERO_POINT, np.uint8), "int8/zero_point"),
        ])

    def _reduce(self, op: str, x: str, out: str):
        if self.opset >= REDUCE_AXES_AS_INPUT_OPSET:
            return self.helper.make_node(op, [x, "int8/axis_1"], [out], keepdims=0)
        return self.helper.make_node(op, [x], [out], axes=[1], keepdims=0)

    def _quantize_activation(self, x: str, k: int, p: str) -> list:
        """x [..., K] -> {p}xq [M, K] uint8, {p}scale_col [M, 1], {p}lead (the leading dims of x)."""
        make = self.helper.make_node
        self.graph.initializer.append(self.numpy_helper.from_array(np.array([-1, k], np.int64), p + "shape_2d"))
        zero_point = self.helper.make_tensor("zp", 2, [1], [ACTIVATION_ZERO_POINT])  # 2: UINT8
        return [
            make("Reshape", [x, p + "shape_2d"], [p + "x"]),  # [M, K]
            self._reduce("ReduceMax", p + "x", p + "max"),  # [M]
            self._reduce("ReduceMin", p + "x", p + "min"),
            make("Neg", [p + "min"], [p + "neg_min"]),
            make("Max", [p + "max", p + "neg_min"], [p + "absmax"]),
            make("Mul", [p + "absmax", "int8/inv_max"], [p + "raw_scale"]),
            make("Max", [p + "raw_scale", "int8/min_scale"], [p + "scale"]),  # [M]
            make("Shape", [p + "scale"], [p + "rows"]),
            make("ConstantOfShape", [p + "rows"], [p + "zero_points"], value=zero_point),  # [M] of 128
            make("QuantizeLinear", [p + "x", p + "scale", p + "zero_points"], [p + "xq"], axis=0),  # [M, K]
            make("Unsqueeze", [p + "scale", "int8/axis_1"], [p + "scale_col"]),  # [M, 1]
            make("Shape", [x], [p + "x_shape"]),
            make("Slice", [p + "x_shape", "int8/start_0", "int8/end_last"], [p + "lead"]),  # x's dims but K
        ]

    def _int8_matmul(self, node, p: str, j: int) -> list:
        """One MatMul on the group's quantized activation; keeps the node's output name."""
        make = self.helper.make_node
        wq, w_scale, n = self._quantized_weight(node.input[1])
        q = f"{p}{j}/"
        return [
            make("MatMulIntegerToFloat", [p + "xq", wq, "int8/one", w_scale, "int8/zero_point"], [q + "y"],
                 domain=MS_DOMAIN, name=(node.name or q) + "_int8"),  # [M, N], times w_scale
            make("Mul", [q + "y", p + "scale_col"], [q + "y_scaled"]),
            make("Concat", [p + "lead", n], [q + "shape"], axis=0),
            make("Reshape", [q + "y_scaled", q + "shape"], [node.output[0]]),  # [..., N]
        ]

    def _quantized_weight(self, name: str) -> tuple[str, str, str]:
        if name not in self.quantized:
            w = self.numpy_helper.to_array(self.weights[name])
            wq, w_scale = quantize_weight(w)
            names = (f"{name}_int8", f"{name}_int8_scale", f"{name}_int8_n")
            self.graph.initializer.extend([
                self.numpy_helper.from_array(wq, names[0]), self.numpy_helper.from_array(w_scale, names[1]),
                self.numpy_helper.from_array(np.array([w.shape[1]], np.int64), names[2]),
            ])
            self.quantized[name] = names
        return self.quantized[name]
