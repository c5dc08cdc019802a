"""Helpers shared by the HuggingFace PyTorch checkpoint converters (`hf.gpt2.params_from_hf`,
`hf.bert.params_from_hf`): config field access, a state-dict view that checks names and shapes, the
abstract parameter tree of a model, per-layer stacking for scanned stacks, and the final check of
a converted tree against the tree the model's `init` builds.

Nothing here imports torch or transformers: state-dict values may be torch tensors (any float
dtype, any device), numpy or jax arrays.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bigjax.errors import UserError


def hf_field(hf_config, name, default=None):
  """`hf_config.<name>` of a transformers PretrainedConfig, or `hf_config[name]` of a dict."""
  if isinstance(hf_config, dict):
    return hf_config.get(name, default)
  return getattr(hf_config, name, default)


def model_kwargs(config, what):
  """A plain dict from a model-kwargs dict or ConfigDict; anything else -> UserError."""
  if hasattr(config, 'to_dict'):
    return dict(config.to_dict())
  if isinstance(config, dict):
    return dict(config)
  raise UserError(
    f'{what}: config must be the kwargs dict (or ConfigDict) that config_from_hf '
    f'returns, got {type(config).__name__}; pass config_from_hf(hf_model.config)'
  )


def build(model_cls, kwargs, what):
  """model_cls(**kwargs); unknown fields -> UserError."""
  try:
    return model_cls(**kwargs)
  except TypeError as e:
    raise UserError(
      f'{what}: config does not fit {model_cls.__module__}.Model ({e}); start from '
      'config_from_hf(hf_model.config)'
    ) from None


def require(model, fixed, what):
  """UserError unless every field in `fixed` ({name: value}) of `model` has that value."""
  for name, want in fixed.items():
    got = getattr(model, name)
    if got != want:
      raise UserError(
        f'{what}: config field {name}={got!r} does not match HuggingFace weights, '
        f'which need {name}={want!r}; start from config_from_hf(hf_model.config)'
      )


def to_numpy(value):
  """float32 numpy array from a torch tensor (numpy() cannot read bfloat16), numpy or jax array."""
  if hasattr(value, 'detach'):
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


class StateDict:
  """Read-only view of a HuggingFace state dict whose names lose `prefix` where they have it.

  'transformer.h.0.ln_1.weight' and 'h.0.ln_1.weight' are both found as 'h.0.ln_1.weight'; names
  outside the prefix ('lm_head.weight', 'cls.predictions.bias') are kept as they are.
  """

  def __init__(self, state_dict, prefix, what):
    if not hasattr(state_dict, 'items'):
      raise UserError(
        f'{what}: state_dict must map parameter names to arrays (e.g. '
        f'hf_model.state_dict()), got {type(state_dict).__name__}'
      )
    self._values = {
      (k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()
    }
    self._prefix, self._what = prefix, what

  def has(self, name):
    return name in self._values

  def take(self, shape, name, *aliases):
    """float32 numpy value of `name` (or the first alias present), checked to have `shape`."""
    for candidate in (name, *aliases):
      if candidate in self._values:
        value = to_numpy(self._values[candidate])
        if value.shape != tuple(shape):
          raise UserError(
            f'{self._what}: state dict entry {candidate!r} has shape {value.shape} '
            f'but the config expects {tuple(shape)}; build the config with '
            'config_from_hf(hf_model.config) of this checkpoint'
          )
        return value
    raise UserError(
      f'{self._what}: state dict has no {name!r} (looked with and without the '
      f'{self._prefix!r} prefix); pass the complete state dict of a checkpoint of '
      'this architecture'
    )

  def check_tied(self, name, embedding_VD):
    """UserError if `name` (an output projection) is present and differs from the embedding."""
    if name in self._values:
      value = to_numpy(self._values[name])
      if value.shape != embedding_VD.shape or not np.array_equal(value, embedding_VD):
        raise UserError(
          f'{self._what}: {name!r} differs from the token embedding (an untied '
          'output layer); bigjax models tie them, so this checkpoint cannot be '
          'converted'
        )


def abstract_params(model, seq_len):
  """Unboxed ShapeDtypeStruct tree of model.init(...)['params']; nothing is computed."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return flax.linen.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))['params']


def stack_layers(per_layer, scan):
  """Per-layer trees -> {'layer_i': tree} (scan=False) or {'layers': tree} whose leaves are the
  per-layer arrays stacked on a leading (num_layers,) axis (scan=True, as nn.scan stores them)."""
  if not scan:
    return {f'layer_{i}': tree for i, tree in enumerate(per_layer)}
  return {'layers': jax.tree.map(lambda *xs: np.stack(xs), *per_layer)}


def check_tree(params, target, what):
  """params as contiguous float32 numpy arrays, after checking it has exactly target's paths and
  shapes (a converter bug or a config the converter does not cover) -> UserError otherwise."""
  got = flax.traverse_util.flatten_dict(params, sep='/')
  want = flax.traverse_util.flatten_dict(target, sep='/')
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  bad = [
    f'{k} {got[k].shape} vs {want[k].shape}'
    for k in sorted(want)
    if k in got and got[k].shape != want[k].shape
  ]
  if missing or extra or bad:
    raise UserError(
      f'{what}: the converted parameters do not fit the model this config builds '
      f'(missing {missing[:4]}, unexpected {extra[:4]}, shapes {bad[:4]}); start '
      'from config_from_hf(hf_model.config)'
    )
  return flax.traverse_util.unflatten_dict(
    {k: np.ascontiguousarray(v, np.float32) for k, v in got.items()}, sep='/'
  )
