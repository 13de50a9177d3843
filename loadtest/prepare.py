"""Before Locust starts: the adapters, the real workload, and every swap version's greedy answer.

- 8 completion adapters for the traffic: the shipped completion examples plus constructed ones
  (loadtest/constructed.py); and SWAP_VERSIONS more constructed folders the admin user rotates
  through under one name.
- The workload: seeded samples of chatterbot-corpus questions with their answers' token counts, and
  rotten-tomatoes reviews for classification (training.data loaders: the bundled, offline sets).
- The references: each swap folder is added under a name of its own on the quiet server, asked the
  probe once whole and once streamed (the two must agree), and removed. The answers must differ from
  each other and from the base's, else a probe's text could not tell versions apart and the check
  would prove nothing: that is an error, not a warning.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx

from loadtest.constructed import write_random_lora
from loadtest.workload import Sample, clip_length

TRAFFIC_ADAPTERS = 8
SWAP_VERSIONS = 3
TRAFFIC_B_STD = 0.05  # constructed traffic adapters: a nudge, the output stays text-like
SWAP_B_STD = 0.2  # swap versions: far enough apart that their greedy answers differ
SAMPLES = 512
CLASSIFY_TEXTS = 512
MIN_OUTPUT_TOKENS = 2  # TPOT needs two tokens
REFERENCE_TIMEOUT_S = 120
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "adapters"


def example_adapters(task: str) -> dict[str, Path]:
    found = {}
    for manifest in sorted(EXAMPLES.glob("*/manifest.json")):
        if json.loads(manifest.read_text()).get("task") == task:
            found[manifest.parent.name] = manifest.parent
    return found


def build_adapters(base_dir: Path, base_name: str, root: Path, seed: int) -> tuple[dict[str, Path], dict[str, Path]]:
    """(traffic adapters by name, swap folders by label), the constructed ones written under `root`."""
    traffic = dict(example_adapters("completion"))
    for i in range(TRAFFIC_ADAPTERS - len(traffic)):
        traffic[f"synth-{i}"] = write_random_lora(base_dir, root / f"synth-{i}", seed * 100 + i, TRAFFIC_B_STD,
                                                  base_name)
    swaps = {f"v{i}": write_random_lora(base_dir, root / f"swap-v{i}", seed * 100 + 50 + i, SWAP_B_STD, base_name)
             for i in range(SWAP_VERSIONS)}
    return traffic, swaps


def completion_samples(tokenizer, seed: int, low: int, high: int) -> tuple[Sample, ...]:
    """Seeded chatterbot questions, each with its corpus answer's length in the base's tokens."""
    from training.data import load_dataset

    examples = list(load_dataset("chatterbot", "completion").examples)
    chosen = random.Random(seed).sample(examples, min(SAMPLES, len(examples)))
    return tuple(Sample(e.prompt, clip_length(len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]),
                                              max(low, MIN_OUTPUT_TOKENS), high)) for e in chosen)


def classify_texts(seed: int) -> tuple[str, ...]:
    from training.data import load_dataset

    examples = list(load_dataset("rotten-tomatoes", "classification").examples)
    return tuple(e.text for e in random.Random(seed + 1).sample(examples, CLASSIFY_TEXTS))


def probe_answer(url: str, model: str, prompt: str, tokens: int) -> tuple[str, int | None]:
    """The greedy completion, whole and streamed (they must agree); and the version header."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
    whole = httpx.post(f"{url}/v1/completions", json=body, timeout=REFERENCE_TIMEOUT_S)
    whole.raise_for_status()
    text = whole.json()["choices"][0]["text"]
    streamed = ""
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                      timeout=REFERENCE_TIMEOUT_S) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                streamed += "".join(c.get("text") or "" for c in json.loads(line[6:]).get("choices", []))
    if streamed != text:
        raise RuntimeError(f"{model}: streamed greedy answer {streamed!r} differs from the whole one {text!r}")
    header = whole.headers.get("x-loraplex-adapter-version")
    return text, int(header) if header else None


def reference_answers(url: str, admin_token: str, base: str, swaps: dict[str, Path], prompt: str,
                      tokens: int) -> dict[str, str]:
    """Each swap folder's greedy answer to the probe, measured alone on the quiet server."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    answers = {}
    for label, folder in swaps.items():
        name = f"reference-{label}"
        added = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)},
                           headers=headers, timeout=REFERENCE_TIMEOUT_S)
        if added.status_code != 200:
            raise RuntimeError(f"adding {folder} for its reference answer: {added.status_code} {added.text}")
        try:
            answers[label], version = probe_answer(url, name, prompt, tokens)
            if version != added.json()["adapter"]["version"]:
                raise RuntimeError(f"{name}: the version header says {version}, the add said "
                                   f"{added.json()['adapter']['version']}")
        finally:
            httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=headers,
                       timeout=REFERENCE_TIMEOUT_S)
    base_answer, _ = probe_answer(url, base, prompt, tokens)
    texts = [*answers.values(), base_answer]
    if len(set(texts)) != len(texts):
        raise RuntimeError(f"the swap versions' greedy answers do not tell them apart: {answers} (base: "
                           f"{base_answer!r}); use another probe prompt or more probe tokens")
    return answers
