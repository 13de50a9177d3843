"""The INT8 rewrite (training/export/quantize.py) on one-MatMul graphs: onnxruntime against the numpy
reference, a row's result independent of its batch, shared inputs and weights, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.errors import TrainingError
from training.export.quantize import quantize_int8, quantize_weight, reference_int8_matmul

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

K, N = 48, 24
REFERENCE_TOLERANCE = 1e-5  # relative to the output's scale: int32 sums are exact, only fp32 scaling differs
INT8_TOLERANCE = 0.03  # relative: how far int7 weights x uint8 activations may stray from fp32 on these random values
IR_VERSION = 10  # onnx writes a newer IR version by default than this onnxruntime reads


def _graph(path: Path, weights: dict[str, np.ndarray], matmuls: list[tuple[str, str]], opset: int = 18) -> Path:
    """x [*, K] -> one output per (weight, output name) MatMul; rank of x left dynamic."""
    nodes = [helper.make_node("MatMul", ["x", w], [out], name=f"mm_{out}") for w, out in matmuls]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None) for _, out in matmuls],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    _save(graph, path, opset)
    return path


def _save(graph, path: Path, opset: int) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    onnx.save(model, str(path))


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _inputs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1, K)[0, 3] = 40.0  # one token with an outlier, like BERT's [CLS]
    return x


@pytest.mark.parametrize("shape", [(5, K), (2, 7, K)])
def test_int8_matmul_equals_the_numpy_reference(tmp_path, shape):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N)).astype(np.float32)
    src = _graph(tmp_path / "fp32.onnx", {"w": w}, [("w", "y")])
    settings = quantize_int8(src, tmp_path / "int8.onnx")
    assert settings["bits"] == 8 and settings["matmuls"] == 1
    x = _inputs(rng, shape)
    got = _session(tmp_path / "int8.onnx").run(["y"], {"x": x})[0]
    expected = reference_int8_matmul(x, w)
    scale = np.abs(x @ w).max()
    assert got.shape == shape[:-1] + (N,)
    np.testing.assert_allclose(got, expected, atol=REFERENCE_TOLERANCE * scale)
    per_row = np.abs(got - x @ w).max(-1) / np.abs(x @ w).max(-1)
    assert per_row.max() <= INT8_TOLERANCE


def test_a_rows_result_does_not_depend_on_its_batch(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((K, N)).astype(np.float32)
    quantize_int8(_graph(tmp_path / "fp32.onnx", {"w": w}, [("w", "y")]), tmp_path / "int8.onnx")
    session = _session(tmp_path / "int8.onnx")
    alone = rng.standard_normal((1, 6, K)).astype(np.float32)
    loud = 100 * rng.standard_normal((1, 6, K)).astype(np.float32)  # would set a per-tensor scale
    batched = session.run(["y"], {"x": np.concatenate([alone, loud])})[0]
    np.testing.assert_array_equal(batched[:1], session.run(["y"], {"x": alone})[0])


def test_matmuls_share_their_input_quantization_and_weights(tmp_path):
    rng = np.random.default_rng(2)
    weights = {"a": rng.standard_normal((K, N)).astype(np.float32),
               "b": rng.standard_normal((K, 2 * N)).astype(np.float32)}
    src = _graph(tmp_path / "fp32.onnx", weights, [("a", "ya"), ("b", "yb"), ("a", "ya2")])
    settings = quantize_int8(src, tmp_path / "int8.onnx")
    model = onnx.load(str(tmp_path / "int8.onnx"))
    ops = [node.op_type for node in model.graph.node]
    assert settings["matmuls"] == 3 and ops.count("QuantizeLinear") == 1 and "MatMul" not in ops
    assert ops.count("MatMulIntegerToFloat") == 3
    int8_weights = [i for i in model.graph.initializer if i.data_type == TensorProto.INT8]
    assert sorted(tuple(i.dims) for i in int8_weights) == [(K, N), (K, 2 * N)]  # "a" stored once
    x = _inputs(rng, (3, K))
    ya, yb, ya2 = _session(tmp_path / "int8.onnx").run(["ya", "yb", "ya2"], {"x": x})
    np.testing.assert_array_equal(ya, ya2)
    np.testing.assert_allclose(yb, reference_int8_matmul(x, weights["b"]), atol=REFERENCE_TOLERANCE * np.abs(yb).max())


def test_weight_quantization_is_symmetric_per_output_channel():
    w = np.array([[1.0, -0.5, 0.0], [-2.0, 0.25, 0.0]], np.float32)  # [K=2, N=3]; the last column is all zero
    wq, scale = quantize_weight(w)
    assert wq.dtype == np.int8 and scale.shape == (3,)
    np.testing.assert_array_equal(wq[:, 0], [31, -63])  # 1 / (2 / 63) is 31.4999 in float32 and np.testing.assert_array_equal(wq[:, 2], [0, 0])
    assert np.abs(wq).max() == 63 and np.all(scale > 0)
    np.testing.assert_allclose(wq * scale, w, atol=scale.max() / 2)


def test_refusals(tmp_path):
    w = np.ones((K, N), np.float32)
    with pytest.raises(TrainingError, match="opset 13"):
        quantize_int8(_graph(tmp_path / "old.onnx", {"w": w}, [("w", "y")], opset=12), tmp_path / "q.onnx")
    x_only = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                               [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    _save(x_only, tmp_path / "relu.onnx", 18)
    with pytest.raises(TrainingError, match="no MatMul"):
        quantize_int8(tmp_path / "relu.onnx", tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()
