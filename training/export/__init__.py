"""`training export`: a base with one adapter merged in, written as a merged HF folder or an ONNX model.

One job per file: `options` (what was asked, checked), `source` (the trained folder on its base, unmerged,
and the rows to check parity on; training.trained_folder reads any method's folder), `merged` (merge and save), `onnx_export` (optimum's exporter), `quantize`
(INT8), `parity` (torch vs ONNX figures), `runner` (the atomic folder that ties them together).
Imports stay lazy here so `training --help` stays quick.
"""
