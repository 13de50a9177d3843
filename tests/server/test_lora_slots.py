"""The stacked LoRA kernel vs the plain loop reference, on random shapes, ranks and adapter mixes."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from adapters import LoraWeights
from server.engine.loaded import LoadedAdapter
from server.engine.lora_layer import ActiveAdapters, LoraLinear
from server.engine.lora_slots import LoraSlots

MODULES = {"q": (24, 16), "v": (8, 16), "down": (16, 40)}  # name -> (out, in)
POPULARITY = ["identical", "distinct", "uniform", "zipf"]


def _adapter(name: str, rank: int, targets: list[str], gen: torch.Generator) -> LoadedAdapter:
    lora = {}
    for module in targets:
        out_features, in_features = MODULES[module]
        lora[module] = LoraWeights(a=torch.randn(rank, in_features, generator=gen),
                                   b=torch.randn(out_features, rank, generator=gen),
                                   scaling=float(torch.rand(1, generator=gen)) + 0.5)
    return LoadedAdapter(name=name, version=1, task="completion", source=None, rank=rank, lora=lora)


def _choose(pool, batch, popularity, rng):
    if popularity == "identical":
        return [pool[0]] * batch
    if popularity == "distinct":
        return [pool[i % len(pool)] for i in range(batch)]
    if popularity == "uniform":
        return [rng.choice(pool + [None]) for _ in range(batch)]
    weights = [1 / (i + 1) ** 1.5 for i in range(len(pool) + 1)]  # zipf-like, None the most popular
    return rng.choices([None] + pool, weights=weights, k=batch)


def _layers(active: ActiveAdapters, gen: torch.Generator) -> dict[str, LoraLinear]:
    layers = {}
    for name, (out_features, in_features) in MODULES.items():
        base = nn.Linear(in_features, out_features)
        with torch.no_grad():
            base.weight.copy_(torch.randn(out_features, in_features, generator=gen))
            base.bias.copy_(torch.randn(out_features, generator=gen))
        layers[name] = LoraLinear(base, name, active)
    return layers


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stacked_equals_loop(popularity, seed):
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    pool = [_adapter(f"a{i}", rng.choice([1, 4, 8, 16]), rng.sample(list(MODULES), rng.randint(1, 3)), gen)
            for i in range(12)]
    loop, stacked = ActiveAdapters(), ActiveAdapters(LoraSlots(6, MODULES, torch.device("cpu"), torch.float32))
    loop_layers, stacked_layers = _layers(loop, gen), {}
    for name, layer in loop_layers.items():
        stacked_layers[name] = LoraLinear(layer.base, name, stacked)
    for step in range(10):  # several batches: slots fill, ranks grow, adapters get evicted and reloaded
        # one token per row (decode) takes the stacked kernel; longer rows (prefill) the per-adapter path
        batch, seq = rng.randint(1, 6), 1 if step % 2 == 0 else rng.randint(2, 3)
        rows = _choose(pool, batch, popularity, rng)
        x = {name: torch.randn(batch, seq, MODULES[name][1], generator=gen) for name in MODULES}
        loop.set_rows(rows, torch.device("cpu"))
        stacked.set_rows(rows, torch.device("cpu"))
        with torch.no_grad():
            for name in MODULES:
                torch.testing.assert_close(stacked_layers[name](x[name]), loop_layers[name](x[name]),
                                           atol=1e-4, rtol=1e-4)
        loop.clear()
        stacked.clear()


def test_a_batch_of_few_among_many_resident_adapters_gathers_its_slots():
    gen = torch.Generator().manual_seed(3)
    loop, stacked = ActiveAdapters(), ActiveAdapters(LoraSlots(8, MODULES, torch.device("cpu"), torch.float32))
    loop_layers = _layers(loop, gen)
    stacked_layers = {name: LoraLinear(layer.base, name, stacked) for name, layer in loop_layers.items()}
    pool = [_adapter(f"a{i}", 4, ["q", "down"], gen) for i in range(8)]
    stacked.set_rows(pool, torch.device("cpu"))  # all 8 resident, in slots 0..7
    stacked.set_rows([pool[1]] * 3 + [pool[0]] * 2, torch.device("cpu"))  # rows share adapters: masked
    assert not stacked.per_row and stacked.gather is None and stacked.width == 2 * 4  # the leading block
    # slots 7 and 6 only: gathered, not the 8-slot leading block
    rows = [pool[7], pool[7], None, pool[6], pool[6], pool[6]]
    stacked.set_rows(rows, torch.device("cpu"))
    loop.set_rows(rows, torch.device("cpu"))
    assert not stacked.per_row and stacked.gather is not None and stacked.width == 2 * 4
    x = torch.randn(6, 1, 16, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(stacked_layers["q"](x), loop_layers["q"](x), atol=1e-5, rtol=1e-5)


def test_rows_without_adapter_get_exactly_the_base():
    gen = torch.Generator().manual_seed(0)
    active = ActiveAdapters(LoraSlots(2, MODULES, torch.device("cpu"), torch.float32))
    layers = _layers(active, gen)
    adapter = _adapter("a", 4, ["q"], gen)
    x = torch.randn(2, 3, 16, generator=gen)
    active.set_rows([None, adapter], torch.device("cpu"))
    with torch.no_grad():
        mixed = layers["q"](x)
        torch.testing.assert_close(mixed[0], layers["q"].base(x)[0], atol=0, rtol=0)
        assert (mixed[1] - layers["q"].base(x)[1]).abs().max() > 1e-3


def test_lru_eviction_spares_the_batch_and_counts():
    gen = torch.Generator().manual_seed(0)
    slots = LoraSlots(2, MODULES, torch.device("cpu"), torch.float32)
    a, b, c = (_adapter(n, 4, ["q"], gen) for n in "abc")
    slots.slots_for([a, b])
    slots.slots_for([a])  # a is now the most recently used
    assert slots.slots_for([c]) == {id(c): slots.slots_for([c])[id(c)]}
    assert slots.evictions == 1 and slots.loads == 3
    assert id(a) in slots.slots_for([a]) and slots.evictions == 1  # b was evicted, not a
    with pytest.raises(ValueError):
        slots.slots_for([a, b, c])


def test_pinned_adapters_are_never_evicted():
    gen = torch.Generator().manual_seed(0)
    slots = LoraSlots(2, MODULES, torch.device("cpu"), torch.float32)
    pinned = _adapter("p", 4, ["q"], gen)
    pinned = LoadedAdapter(**{**pinned.__dict__, "pinned": True})
    a, b = _adapter("a", 4, ["q"], gen), _adapter("b", 4, ["v"], gen)
    slots.slots_for([pinned])
    slots.slots_for([a])
    slots.slots_for([b])  # must evict a, the only unpinned resident, although pinned is older
    assert slots.slots_for([pinned]) and slots.evictions == 1 and slots.hits == 1


def test_per_row_decode_follows_rows_joining_leaving_and_slots_reloaded():
    """Decode steps on mostly distinct adapters take the per-row kernel; its row buffers must follow rows
    that join, leave and shift, slots refilled with other adapters, and rank growth."""
    gen, rng = torch.Generator().manual_seed(7), random.Random(7)
    loop, stacked = ActiveAdapters(), ActiveAdapters(LoraSlots(4, MODULES, torch.device("cpu"), torch.float32))
    loop_layers = _layers(loop, gen)
    stacked_layers = {name: LoraLinear(layer.base, name, stacked) for name, layer in loop_layers.items()}
    pool = [_adapter(f"a{i}", 4 if i < 5 else 8, rng.sample(list(MODULES), 2), gen) for i in range(7)]
    rows = [pool[0], pool[1], None, pool[2]]
    per_row_steps = 0
    for step in range(24):
        if step % 3 == 2:  # a row leaves, the rest shift up, and another request joins at the end
            rows.pop(rng.randrange(len(rows)))
            rows.append(rng.choice(pool[: 5 if step < 12 else 7] + [None]))  # later: rank-8 adapters too
        loop.set_rows(rows, torch.device("cpu"))
        stacked.set_rows(rows, torch.device("cpu"))
        per_row_steps += stacked.per_row
        x = {name: torch.randn(len(rows), 1, MODULES[name][1], generator=gen) for name in MODULES}
        with torch.no_grad():
            for name in MODULES:
                torch.testing.assert_close(stacked_layers[name](x[name]), loop_layers[name](x[name]),
                                           atol=1e-4, rtol=1e-4)
        loop.clear()
        stacked.clear()
    assert per_row_steps >= 12 and stacked.slots.evictions > 0 and stacked.slots.rank == 8


def test_per_row_views_are_reused_while_the_batch_stays_the_same():
    gen = torch.Generator().manual_seed(1)
    active = ActiveAdapters(LoraSlots(4, MODULES, torch.device("cpu"), torch.float32))
    pool = [_adapter(f"a{i}", 4, ["q"], gen) for i in range(3)]
    active.set_rows(pool, torch.device("cpu"))
    first = active.row_weights.views("q")
    assert active.per_row and active.row_weights.views("v") is None  # no row's adapter targets v
    active.clear()
    active.set_rows(pool, torch.device("cpu"))
    assert active.row_weights.views("q") is first  # same rows, same slot contents: nothing rebuilt
    active.set_rows(pool[:2], torch.device("cpu"))
    assert active.row_weights.views("q") is not first


def test_per_row_decode_of_a_bfloat16_base_computes_the_delta_in_float32():
    gen = torch.Generator().manual_seed(5)
    pool = [_adapter(f"a{i}", 8, ["q", "v"], gen) for i in range(3)]
    active = ActiveAdapters(LoraSlots(4, MODULES, torch.device("cpu"), torch.bfloat16))
    active.set_rows([pool[0], None, pool[2], pool[1]], torch.device("cpu"))
    assert active.per_row
    x = torch.randn(4, 1, 16, generator=gen)
    base_out = torch.randn(4, 1, 24, generator=gen)
    with torch.no_grad():
        got = active.apply("q", x.bfloat16(), base_out.bfloat16().clone())
    assert got.dtype == torch.bfloat16 and active.row_weights.views("q")[0].dtype == torch.float32
    expected = base_out.clone()
    for row, adapter in enumerate([pool[0], None, pool[2], pool[1]]):
        if adapter is not None:  # the reference in float32 from the bfloat16 weights the slots hold
            w = adapter.lora["q"]
            a, b = w.a.bfloat16().float(), (w.b * w.scaling).bfloat16().float()
            expected[row] += x[row].bfloat16().float() @ a.T @ b.T
    torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=2e-2)


def test_retired_pinned_adapters_give_their_slot_back_but_not_to_their_own_batch():
    """Regression: a pinned adapter that was removed or replaced kept its slot forever."""
    gen = torch.Generator().manual_seed(0)
    slots = LoraSlots(2, MODULES, torch.device("cpu"), torch.float32)
    old, other = (LoadedAdapter(**{**_adapter(n, 4, ["q"], gen).__dict__, "pinned": True}) for n in ("old", "other"))
    slots.slots_for([old, other])
    fresh = _adapter("fresh", 4, ["v"], gen)
    with pytest.raises(RuntimeError, match="no LoRA slot can be freed"):
        slots.slots_for([fresh])
    slots.retire(old)
    with pytest.raises(RuntimeError, match="no LoRA slot can be freed"):
        slots.slots_for([old, fresh])  # a batch still using the retired adapter keeps it
    old_slot = slots.slots_for([old])[id(old)]
    assert slots.slots_for([fresh]) == {id(fresh): old_slot} and slots.evictions == 1
    assert slots.slots_for([other]) and slots.hits >= 2  # the pinned one that was not retired stayed
