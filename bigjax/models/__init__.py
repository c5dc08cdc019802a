"""Pure Linen models. `config.model.name='cnn'` builds `bigjax.models.cnn.Model`.

Every model is called as `model.apply(variables, x, train=bool, rngs=...)` and returns logits.
A model family's `Model` declares `data_fields`: its fields that build() fills from the data
(e.g. {'num_classes': 'output_size'}: the task's output size; {'vocab_size': 'vocab_size'}: the
tokenizer's), so configs never state them. Models raise ValueError about their own fields;
build() turns that into a `config.model.kwargs.FIELD` message. No model imports a data module.
"""
