"""Classification on CPU, side by side in ONE run: torch fp32 vs ONNX Runtime fp32 vs ONNX Runtime INT8.

The subject is the shipped minilm-l6 `sentiment` adapter over its held-out rotten-tomatoes rows (the split
`training eval` uses). torch runs the adapter merged into the base (the fastest torch form); the ONNX graphs
are `training export --format onnx` with and without `--quantize int8` (int8 weights per output channel x
uint8 activations with one scale per token: training/export/quantize.py). Two other INT8 recipes are shown
for comparison only, made from the same fp32 graph with onnxruntime's own quantizers: `ort_int8_dyn`
(`quantize_dynamic`, per-channel weights, one activation scale per batch tensor: about as fast, short of
the 99% argmax agreement the export promises) and `ort_int8_nbits` (`MatMulNBitsQuantizer`, 8-bit, block
128, accuracy_level 4: faithful, but little faster than fp32 on x86). A request is `--batch` consecutive
held-out texts, cut at 64 tokens: tokenize, one forward, softmax. Each engine serves all its requests in
turn (interleaving them let one engine's spinning thread pool slow the next). Every engine gets the same
thread count (torch.set_num_threads and onnxruntime's intra_op_num_threads). Accuracy and argmax agreement
with torch are taken over all the held-out rows. The last line printed is JSON.

    python benchmarks/bench_onnx_classify.py                       # batch 1 and 32, 2 threads (about 5 min)
    python benchmarks/bench_onnx_classify.py --batch1-requests 64  # quicker
    python benchmarks/bench_onnx_classify.py --no-comparisons      # torch, ORT fp32 and the export's INT8 only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from adapters import read_adapter_folder, read_export_folder, resolve_base
from training.config import TrainConfig
from training.data import load_dataset, split_dataset
from training.evaluate import relabel
from training.export.options import ExportOptions
from training.export.runner import export_adapter
from training.models import load_sequence_classifier, load_tokenizer

ADAPTER = Path(__file__).resolve().parents[1] / "examples" / "adapters" / "sentiment"
MAX_LENGTH = 64
WARMUP_REQUESTS = 3
COMPARISONS = ("ort_int8_dyn", "ort_int8_nbits")  # other INT8 recipes; `training export` writes neither
NBITS_BLOCK_SIZE = 128
NBITS_ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations per block, int8 x int8 compute
Engine = Callable[[dict[str, np.ndarray]], np.ndarray]  # token arrays [B, S] -> logits [B, labels]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="threads for every engine")
    p.add_argument("--batches", default="1,32", help="texts per request, comma-separated")
    p.add_argument("--batch1-requests", type=int, default=256, help="requests at batch 1 (larger batches use all rows)")
    p.add_argument("--export-dir", type=Path, help="reuse (or write) the exports here instead of a temp folder")
    p.add_argument("--cache-dir", type=Path, default=None, help="where prepared bases are cached")
    p.add_argument("--no-comparisons", action="store_true", help=f"leave out {', '.join(COMPARISONS)}")
    return p.parse_args()


def held_out(tokenizer_labels: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    folder = read_adapter_folder(ADAPTER)
    config = TrainConfig.from_manifest(folder.manifest.train_config)
    dataset = relabel(load_dataset(config.data, "classification"), tokenizer_labels)
    rows = split_dataset(dataset, config.val_fraction, config.split_seed, config.eval_rows).validation.examples
    return [r.text for r in rows], np.array([r.label for r in rows])


def exports(root: Path, threads: int, comparisons: bool) -> dict[str, Path]:
    found = {}
    for name, quantize in (("ort_fp32", "none"), ("ort_int8", "int8")):
        out = root / f"sentiment-{quantize}"
        if not (out / "export_manifest.json").is_file():
            export_adapter(ExportOptions(adapter_dir=ADAPTER, out=out, quantize=quantize, parity_rows=32,
                                         threads=threads))
        found[name] = out / "model.onnx"
    if comparisons:
        for name in COMPARISONS:
            found[name] = root / f"sentiment-{name}.onnx"
            if not found[name].is_file():
                quantize_for_comparison(name, found["ort_fp32"], found[name])
    return found


def quantize_for_comparison(name: str, fp32: Path, dest: Path) -> None:
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quiet = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.WARNING)  # both quantizers log one INFO line per graph node
    try:
        if name == "ort_int8_dyn":
            quantize_dynamic(fp32, dest, weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"MatMulConstBOnly": True})
        else:
            quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=8, block_size=NBITS_BLOCK_SIZE,
                                             is_symmetric=True, accuracy_level=NBITS_ACCURACY_LEVEL)
            quantizer.process()
            quantizer.model.save_model_to_file(str(dest), use_external_data_format=False)
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)


def torch_engine(threads: int, labels: tuple[str, ...], cache_dir: Path | None) -> Engine:
    from peft import PeftModel

    torch.set_num_threads(threads)
    base = resolve_base("minilm-l6", cache_dir or TrainConfig(base="x", data="x", out=Path(".")).cache_dir)
    model = load_sequence_classifier(base, labels, load_tokenizer(base.path).pad_token_id)
    model = PeftModel.from_pretrained(model, ADAPTER).merge_and_unload().eval()

    @torch.inference_mode()
    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    return run


def ort_engine(model_file: Path, threads: int) -> Engine:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda batch: session.run(["logits"], {n: batch[n] for n in names})[0]


def serve(engine: Engine, tokenizer, texts: list[str]) -> np.ndarray:
    """One request: tokenize, forward, softmax; returns the probabilities [B, labels]."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    logits = engine({k: v.astype(np.int64) for k, v in batch.items()}).astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def run_batch_size(engines: dict[str, Engine], tokenizer, texts: list[str], batch: int,
                   n_requests: int) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    requests = [texts[i:i + batch] for i in range(0, len(texts), batch)][:n_requests]
    for name, engine in engines.items():
        for request in requests[:WARMUP_REQUESTS]:
            serve(engine, tokenizer, request)
    latencies: dict[str, list[float]] = {name: [] for name in engines}
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in engines}
    for name, engine in engines.items():  # one engine at a time: the idle ones' thread pools stay out of the way
        for request in requests:
            started = time.perf_counter()
            outputs[name].append(serve(engine, tokenizer, request))
            latencies[name].append(time.perf_counter() - started)
    figures = {}
    for name, values in latencies.items():
        ordered = sorted(values)
        figures[name] = {
            "requests": len(values), "texts": sum(len(r) for r in requests),
            "requests_per_s": round(len(values) / sum(values), 2),
            "texts_per_s": round(sum(len(r) for r in requests) / sum(values), 1),
            "p50_ms": round(1000 * statistics.median(ordered), 2),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
        }
    return figures, {name: np.concatenate(parts) for name, parts in outputs.items()}


def main() -> None:
    args = parse_args()
    labels = read_adapter_folder(ADAPTER).labels
    texts, gold = held_out(labels)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.export_dir or Path(tmp)
        files = exports(root, args.threads, not args.no_comparisons)
        engines = {"torch_fp32": torch_engine(args.threads, labels, args.cache_dir)}
        engines.update({name: ort_engine(path, args.threads) for name, path in files.items()})
        int8_recipe = read_export_folder(files["ort_int8"].parent).settings["quantization"]["method"]
        print(f"ort_int8 (training export --quantize int8): {int8_recipe}")
        tokenizer = load_tokenizer(files["ort_fp32"].parent)
        tokenizer.padding_side = "right"
        results: dict[str, dict] = {}
        quality: dict[str, dict] = {}
        for batch in (int(b) for b in args.batches.split(",")):
            n_requests = args.batch1_requests if batch == 1 else len(texts)
            figures, probs = run_batch_size(engines, tokenizer, texts, batch, n_requests)
            reference = probs["torch_fp32"].argmax(-1)
            for name in engines:
                predicted = probs[name].argmax(-1)
                figures[name]["throughput_vs_torch"] = round(
                    figures[name]["requests_per_s"] / figures["torch_fp32"]["requests_per_s"], 2)
                figures[name]["p50_vs_torch"] = round(figures[name]["p50_ms"] / figures["torch_fp32"]["p50_ms"], 2)
                figures[name]["p99_vs_torch"] = round(figures[name]["p99_ms"] / figures["torch_fp32"]["p99_ms"], 2)
                if len(predicted) == len(texts):  # every held-out row went through: quality figures
                    quality[name] = {
                        "rows": len(texts), "accuracy": round(float((predicted == gold).mean()), 4),
                        "argmax_agreement_with_torch": round(float((predicted == reference).mean()), 4),
                        "max_abs_prob_diff_vs_torch": float(f"{np.abs(probs[name] - probs['torch_fp32']).max():.3g}"),
                    }
            results[f"batch_{batch}"] = figures
            print(f"\nbatch {batch} ({figures['torch_fp32']['requests']} requests, max length {MAX_LENGTH}, "
                  f"{args.threads} threads)")
            print(f"{'engine':<15}{'req/s':>9}{'texts/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'x req/s':>9}"
                  f"{'x p50':>7}{'x p99':>7}")
            for name, f in figures.items():
                print(f"{name:<15}{f['requests_per_s']:>9}{f['texts_per_s']:>9}{f['p50_ms']:>9}{f['p99_ms']:>9}"
                      f"{f['throughput_vs_torch']:>9}{f['p50_vs_torch']:>7}{f['p99_vs_torch']:>7}")
    print("\nquality over all held-out rows (from the largest batch run):")
    for name, q in quality.items():
        print(f"  {name:<15} accuracy {q['accuracy']:.4f}  agreement with torch {q['argmax_agreement_with_torch']:.4f}")
    summary = {"adapter": "sentiment (minilm-l6)", "threads": args.threads, "max_length": MAX_LENGTH,
               "cpu_count": os.cpu_count(), "int8_recipe": int8_recipe, "results": results, "quality": quality}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
