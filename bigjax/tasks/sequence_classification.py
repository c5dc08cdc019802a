"""Sequence classification (e.g. BERT fine-tuning): the classification task on token inputs.

The model pools the sequence itself (bert.Model with head='classify' returns (B, K) logits), so the
objective is exactly `classification`'s; this name exists so configs can say what they do.
"""

from bigjax.tasks.classification import Task  # noqa: F401
