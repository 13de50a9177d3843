"""INT8 quantization of an exported ONNX graph with onnxruntime's quantizer.

Every weight MatMul becomes a MatMulNBits node with 8-bit weights (symmetric, one scale per block of
INT8_BLOCK_SIZE input channels) and accuracy level 4: at run time onnxruntime quantizes the activations
to int8 per block too and multiplies int8 x int8. Embedding lookups, layer norms and softmax stay fp32.

Why not `quantize_dynamic` (per-tensor uint8 activations): measured on the minilm-l6 sentiment adapter over
its 2,048 held-out rows, it agreed with torch's argmax on 95.3% of the rows (98.3% with per-channel
weights), short of the 99% this export promises, and one scale per whole batch tensor makes a row's
result depend on what else is in its batch. Block-wise scales agreed on 99.5% at the same speed-up, and a
row's result is the same whatever it is batched with.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from training.export.onnx_export import EXPORT_EXTRA_HINT, ExportToolsMissingError

INT8_BITS = 8
INT8_BLOCK_SIZE = 128  # input channels per weight scale; 32 was a little more faithful and far slower on CPU
QUANTIZER_LOGGER = "onnxruntime.quantization.matmul_nbits_quantizer"
INT8_ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations (quantized per block at run time), int8 x int8 compute


def quantize_int8(src: Path, dest: Path) -> dict[str, Any]:
    """Write the INT8 version of the ONNX graph `src` to `dest`; returns the settings for the manifest."""
    try:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:
        raise ExportToolsMissingError(f"INT8 quantization needs onnxruntime and onnx-ir ({exc}); "
                                      f"{EXPORT_EXTRA_HINT}") from exc
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=INT8_BITS, block_size=INT8_BLOCK_SIZE, is_symmetric=True,
        accuracy_level=INT8_ACCURACY_LEVEL,
    )
    quantizer_log = logging.getLogger(QUANTIZER_LOGGER)
    level = quantizer_log.level
    quantizer_log.setLevel(logging.WARNING)  # it logs one INFO line per graph node
    try:
        quantizer.process()
    finally:
        quantizer_log.setLevel(level)
    quantizer.model.save_model_to_file(str(dest), use_external_data_format=False)
    return {"method": "onnxruntime MatMulNBits (weight int8 per block, activations int8 per block at run time)",
            "bits": INT8_BITS, "block_size": INT8_BLOCK_SIZE, "symmetric": True,
            "accuracy_level": INT8_ACCURACY_LEVEL, "op_types": ["MatMul"]}
