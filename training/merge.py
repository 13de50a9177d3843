"""`training merge OUT --adapter DIR=WEIGHT ... --method M`: LoRA adapters of one base -> one adapter folder.

The combination is PEFT's own `add_weighted_adapter` (peft/tuners/lora/model.py), run on the parents loaded
onto their base; OUT is a normal PEFT folder plus our manifest naming the parents, their weights and the
method. With s_i = alpha_i / r_i (or alpha_i / sqrt(r_i)) the parent's scaling, per module:

- `cat`: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...], rank = sum of ranks, so the delta is
  exactly sum_i w_i s_i B_i A_i. This is what the server computes for a per-request combination
  (`"model": "a:0.7+b:0.3"`), without any merge.
- `linear`: A = sum_i sqrt(w_i s_i) A_i, B = sum_i sqrt(w_i s_i) B_i (the sign on A's side). Cheap (the rank
  stays r) but B A has cross terms B_i A_j: it is not the weighted sum of deltas. Needs equal ranks (PEFT) and,
  here, the same target modules (a factor of one parent summed with nothing of another is not a merge the
  user can reason about).
- `svd`: the exact weighted delta sum_i w_i s_i B_i A_i, truncated by SVD to --svd-rank (default: the largest
  parent rank).
- `ties`, `dare_linear`, `dare_ties`: the A's and the B's combined separately, as `linear`, after pruning each
  to --density (TIES: by magnitude, with a sign election; DARE: at random, rescaled). Equal ranks. DARE's draws
  come from torch's RNG, seeded with --seed, so a merge is reproducible.

One departure from PEFT: PEFT gives the merged adapter the first parent's config with r = alpha = new rank,
so with an rsLoRA first parent its scaling would be alpha / sqrt(r) = sqrt(r) on top of the parents' own
scalings, which are already folded into the factors. The merged adapter is written with `use_rslora` off,
scaling exactly 1, so its delta is the combination above whatever the first parent is.

Parents must be LoRA completion folders (lora or qlora; not DoRA) of one base: what the server stacks. Anything
else is refused with a message naming the parent, before the base loads where that can be told from the folder.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapters import (AdapterMismatchError, BaseSignature, Manifest, atomic_directory, resolve_base,
                      validate_against_base, write_manifest)
from adapters.manifest import MERGE_METHODS, MIN_MERGE_PARENTS
from training.config import default_cache_dir
from training.errors import ConfigError
from training.models import load_causal_lm
from training.trained_folder import LORA_METHODS, TrainedFolder, read_trained_folder

log = logging.getLogger(__name__)

DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")  # prune each parent to a density first
FACTOR_METHODS = ("linear", *DENSITY_METHODS)  # combine the A's and the B's separately: equal ranks
SAME_TARGET_METHODS = ("linear",)
MAX_MERGE_PARENTS = 16  # each parent is a full LoRA model in memory while PEFT combines them
MERGED = "default"  # PEFT saves the adapter of this name at the folder's root
PARENT_PREFIX = "parent"  # PEFT adapter names of the parents while merging


@dataclass(frozen=True)
class MergeParent:
    path: Path
    weight: float


@dataclass(frozen=True)
class MergeOptions:
    """One `training merge` run, checked before anything heavy loads."""

    out: Path
    parents: tuple[MergeParent, ...]
    method: str
    density: float | None = None  # ties / dare_*: the fraction of each parent's values kept
    svd_rank: int | None = None  # svd: the merged rank (default: the largest parent rank)
    seed: int = 0  # DARE's random pruning
    base: str | None = None  # default: the first parent's base
    cache_dir: Path = field(default_factory=default_cache_dir)

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise ConfigError(f"--method must be one of {', '.join(MERGE_METHODS)}, got {self.method!r}")
        if not MIN_MERGE_PARENTS <= len(self.parents) <= MAX_MERGE_PARENTS:
            raise ConfigError(f"a merge takes {MIN_MERGE_PARENTS} to {MAX_MERGE_PARENTS} --adapter DIR=WEIGHT "
                              f"parents, got {len(self.parents)}")
        for parent in self.parents:
            if not math.isfinite(parent.weight):
                raise ConfigError(f"--adapter {parent.path}: the weight must be a finite number, got {parent.weight}")
        resolved = [p.path.expanduser().resolve() for p in self.parents]
        if len(set(resolved)) != len(resolved):
            raise ConfigError("the same adapter folder is given twice; give it once, with the sum of its weights")
        names = [p.path.name for p in self.parents]
        if len(set(names)) != len(names):
            raise ConfigError(f"parents share a folder name ({names}); the manifest names parents by folder name: "
                              "rename or copy one")
        if self.method in DENSITY_METHODS:
            if self.density is None or not 0 < self.density <= 1:
                raise ConfigError(f"--method {self.method} needs --density in (0, 1], got {self.density}")
        elif self.density is not None:
            raise ConfigError(f"--density applies to {', '.join(DENSITY_METHODS)} only, not --method {self.method}")
        if self.svd_rank is not None and (self.method != "svd" or self.svd_rank <= 0):
            raise ConfigError("--svd-rank applies to --method svd only, and must be positive")


@dataclass(frozen=True)
class MergeResult:
    out: Path
    manifest: Manifest
    rank: int


def parse_parent(text: str) -> MergeParent:
    """`DIR=WEIGHT` (split at the last '=', so a folder name may hold one)."""
    path, sep, weight = text.rpartition("=")
    if not sep or not path:
        raise ConfigError(f"--adapter takes DIR=WEIGHT, got {text!r}")
    try:
        value = float(weight)
    except ValueError as exc:
        raise ConfigError(f"--adapter {text!r}: the weight {weight!r} is not a number") from exc
    return MergeParent(Path(path), value)


def merge_adapters(options: MergeOptions) -> MergeResult:
    """Check the parents, combine them with PEFT on their base, write OUT atomically."""
    from peft import PeftModel  # heavy: only once the options are known to be good

    folders = [read_trained_folder(p.path) for p in options.parents]
    check_parents(folders, options.method)
    base = resolve_base(_base_ref(folders[0], options.base), options.cache_dir)
    model = load_causal_lm(base)
    signature = BaseSignature.of(model, base.name, base.fingerprint)
    for folder in folders:
        _check_base(folder, signature)
    names = [f"{PARENT_PREFIX}{i}" for i in range(len(folders))]
    peft_model = PeftModel.from_pretrained(model, folders[0].path, adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        peft_model.load_adapter(folder.path, adapter_name=name)
    torch.manual_seed(options.seed)
    peft_model.add_weighted_adapter(
        names, [p.weight for p in options.parents], MERGED, combination_type=options.method,
        density=options.density, svd_rank=options.svd_rank,
    )
    _unit_scaling(peft_model, MERGED)
    rank = peft_model.peft_config[MERGED].r
    with atomic_directory(options.out) as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[MERGED])
        manifest = write_manifest(tmp, Manifest(
            task="completion", base_name=base.name, base_fingerprint=base.fingerprint, method="lora",
            parents=tuple(p.path.name for p in options.parents), weights=tuple(p.weight for p in options.parents),
            merge_method=options.method, train_config=_merge_record(options, folders, base.name, rank),
        ))
    log.info("merged %d adapters (%s) into %s, rank %d", len(folders), options.method, options.out, rank)
    return MergeResult(out=Path(options.out), manifest=manifest, rank=rank)


def check_parents(folders: list[TrainedFolder], method: str) -> None:
    """ConfigError / AdapterMismatchError naming the parent that cannot be merged, from the folders alone."""
    for folder in folders:
        name = folder.path.name
        if folder.method not in LORA_METHODS:
            raise ConfigError(f"parent {name!r} is a {folder.method} adapter; only LoRA adapters (lora, qlora) merge")
        if folder.lora is None:
            raise ConfigError(f"parent {name!r} is a DoRA adapter; its magnitude vectors do not merge with "
                              "add_weighted_adapter")
        if folder.task != "completion":
            raise ConfigError(f"parent {name!r} is a {folder.task} adapter; only completion adapters merge "
                              "(each classifier has its own head, which does not combine)")
    fingerprints = {f.manifest.base_fingerprint: f.path.name for f in folders
                    if f.manifest is not None and f.manifest.base_fingerprint}
    if len(fingerprints) > 1:
        raise AdapterMismatchError(f"the parents were trained on different bases (fingerprints {fingerprints}); "
                                   "only adapters of one base merge")
    if method in FACTOR_METHODS:
        ranks = {f.path.name: sorted({w.rank for w in f.lora.lora.values()}) for f in folders}
        if len({tuple(r) for r in ranks.values()}) > 1 or any(len(r) > 1 for r in ranks.values()):
            raise ConfigError(f"--method {method} combines the A and B factors, so every parent needs one and the "
                              f"same rank; ranks: {ranks}. Use --method cat (exact) or svd")
    if method in SAME_TARGET_METHODS:
        targets = {f.path.name: sorted(f.lora.lora) for f in folders}
        first = next(iter(targets.values()))
        if any(t != first for t in targets.values()):
            differ = [n for n, t in targets.items() if t != first]
            raise ConfigError(f"--method {method} needs parents that target the same modules; {differ} target "
                              f"other modules than {folders[0].path.name!r}. Use --method cat (exact) or svd")


def _base_ref(folder: TrainedFolder, override: str | None) -> str:
    """--base, else the base the first parent's manifest names, else its PEFT config's (a stock PEFT folder)."""
    try:
        return folder.base_ref(override)
    except ConfigError:
        recorded = folder.peft_config.get("base_model_name_or_path")
        if not recorded:
            raise ConfigError(f"parent {folder.path.name!r} names no base (no manifest, no base_model_name_or_path "
                              "in its adapter_config.json); pass --base") from None
        return str(recorded)


def _check_base(folder: TrainedFolder, signature: BaseSignature) -> None:
    """The parent fits the base it is merged on, in the server's words (adapters.validate_against_base)."""
    try:
        validate_against_base(folder.lora, signature)
    except AdapterMismatchError as exc:
        raise AdapterMismatchError(f"parent {folder.path.name!r}: {exc}") from exc


def _unit_scaling(peft_model: Any, name: str) -> None:
    """The merged adapter's scaling is 1 (r = alpha, no rsLoRA): see the module docstring."""
    from peft.tuners.lora import LoraLayer

    config = peft_model.peft_config[name]
    if not config.use_rslora:
        return
    config.use_rslora = False
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and name in module.scaling:
            module.scaling[name] = config.lora_alpha / config.r


def _merge_record(options: MergeOptions, folders: list[TrainedFolder], base_name: str, rank: int) -> dict[str, Any]:
    """The manifest's train_config for a merge: how to redo it (parents' paths and digests, options)."""
    return {
        "base": options.base or base_name, "task": "completion", "command": "merge", "merge_method": options.method,
        "density": options.density, "svd_rank": options.svd_rank, "seed": options.seed, "rank": rank,
        "parents": [{"name": f.path.name, "path": str(p.path), "weight": p.weight, "digest": f.digest()}
                    for p, f in zip(options.parents, folders)],
    }
