"""Model compression, one module per method, each a config section of base_config.

- distill.py   config.distill: a frozen teacher's softened outputs as a second loss term.
- prune.py     config.prune: magnitude / N:M masks as an optax wrapper (masks in the optimizer
               state), one-shot or gradual (Zhu & Gupta 2017) schedules.
- quantize.py  config.quantize: int8/int4/fp8 post-training quantization and quantization-aware
               training through Qwix.
"""
