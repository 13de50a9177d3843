"""`training export`: a base with one adapter merged in, written as a merged HF folder, an ONNX model, or an
INT8 / INT4 quantized base checkpoint (the adapter merged, or the base alone).

One job per file: `options` (what was asked, checked), `source` (the trained folder on its base, unmerged,
and the rows to check parity on; training.trained_folder reads any method's folder), `merged` (merge and
save), `onnx_export` (optimum's exporter), `quantize` (the ONNX graph's INT8 rewrite), `quantized_export`
(int8 / int4 base checkpoints, adapters.quantized), `heldout_text` (the real text their perplexity is
measured on), `parity` (the figures against the torch reference), `runner` (the atomic folder that ties
them together). Imports stay lazy here so `training --help` stays quick.
"""
