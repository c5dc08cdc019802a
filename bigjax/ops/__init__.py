"""Alternative formulations of standard operations, each equal to a reference formulation (values
and gradients; tests/test_formulations.py) and used where it was measured to pay:

  cross_entropy   next-token cross-entropy of a linear head, chunk by chunk, never materialising
                  the (tokens, vocabulary) logits (a GPU candidate; experiments/bench/gpu_checks.py).
"""
