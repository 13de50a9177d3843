"""Segmented-gather LoRA kernels (Punica's SGMV/BGMV idea) over rank-packed adapter pools.

`lora_pool` holds the layout (adapters of mixed ranks packed row by row, no padding), `sgmv` the Triton
kernels with their wiring contract, `reference` the loop every kernel is tested against.
"""
