"""HF PEFT prompt-tuning and prefix-tuning adapters onto the imported base (config.peft.init_from
with config.peft.method 'prompt' / 'prefix'; hf_import.loader calls this).

Both save one tensor, `prompt_embeddings`:
  PROMPT_TUNING  (P, D): the virtual token embeddings -> virtual_tokens/prompt_embeddings;
  PREFIX_TUNING  (P, L * 2 * K * H): per virtual token, layer by layer, the key then the value
                 (K key/value heads of H: PEFT gives grouped-query models K heads) -> each layer's
                 self_attention/key/prefix and value/prefix (P, K, H). PEFT saves the final
                 prefixes also when it trained them through its reparameterization MLP
                 (prefix_projection), so either imports.
"""

from __future__ import annotations

from collections.abc import Callable
import re

import numpy as np

from bigjax.errors import UserError
from bigjax.peft.hf_directory import Adapter

TENSOR = 'prompt_embeddings'
_LAYER = re.compile(r'(^|/)layer_(\d+)/')


def loaders(adapter: Adapter, abstract_params) -> dict[str, Callable[[], np.ndarray]]:
  """{model param path: loader} of the adapter's virtual tokens; UserError (naming the file) for
  a tensor whose shape another base would have."""
  from bigjax.models.hf import convert
  from bigjax.peft import hf_import

  if TENSOR not in adapter.shapes or len(adapter.shapes) != 1:
    raise UserError(
      f'{adapter.weights_file} holds {sorted(adapter.shapes)}, not the one {TENSOR!r} tensor of '
      f'a {adapter.config["peft_type"]} adapter; re-save it'
    )
  got = adapter.shapes[TENSOR]
  shapes = convert.flat_shapes(abstract_params)
  if adapter.method == 'prompt':
    path = 'virtual_tokens/prompt_embeddings'
    _check(adapter, got, shapes[path])
    return {path: hf_import.reader(adapter, TENSOR, lambda a: a, shapes[path])}
  per_layer = convert.unscanned_shapes(shapes)
  layers = {
    int(m.group(2)): p
    for p in per_layer
    if p.endswith('/key/prefix') and (m := _LAYER.search(p)) is not None
  }
  p, kv, h = per_layer[layers[0]][2]
  _check(adapter, got, (p, len(layers) * 2 * kv * h))
  out = {}
  for i, key in layers.items():
    for j, path in enumerate((key, key.replace('/key/prefix', '/value/prefix'))):
      out[path] = hf_import.reader(
        adapter,
        TENSOR,
        lambda a, i=i, j=j: a.reshape(p, len(layers), 2, kv, h)[:, i, j],
        (p, kv, h),
      )
  return hf_import.stack_layers(out, per_layer, shapes, adapter)


def _check(adapter: Adapter, got, want) -> None:
  if tuple(got) != tuple(want):
    raise UserError(
      f'{adapter.weights_file}: {TENSOR!r} has shape {tuple(got)} but the base model '
      f'(config.init_from.hf) needs {tuple(want)}; the adapter is for another base'
    )
