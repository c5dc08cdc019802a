"""Pure Linen models. `config.model.name='cnn'` builds `bigjax.models.cnn.Model(**config.model.kwargs)`.

Every model is called as `model.apply(variables, x, train=bool, rngs=...)` and returns logits.
"""
