"""`explain(run, method, ...)`: one explanation method on a loaded run -> a dict of numpy arrays.

  run = bigjax.explain.load_run('runs/mnist_cnn')
  out = bigjax.explain.explain(run, 'integrated_gradients', indices=[0, 1, 2], baseline='blurred')
  out['attributions']        # (3, 28, 28, 1); out['completeness'] (3, 2): sum, f(x) - f(x')

Which methods apply depends on the run: `methods_for(run)`. bigjax-explain (cli.py) writes these
arrays to .npz and draws them as PNGs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bigjax.errors import UserError
from bigjax.explain import attention, gradcam, gradients, integrated, tabular, text
from bigjax.explain.run import Run
from bigjax.explain.scores import predicted_targets

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Options:
  """Method settings (the CLI flags of the same names).

  target: class (or token) to explain, None = the predicted one. position: text, the token whose
  prediction is explained (None = the last real token). baseline: integrated gradients' reference
  ('black' | 'blurred' | 'noise'; text 'black' | 'pad'). steps: its Riemann steps. noise_level,
  num_samples: SmoothGrad's. layer: Grad-CAM's target layer (None = the last feature map).
  batch_steps: how many IG steps / SmoothGrad samples run at once (None = all). seed: noise and
  SHAP background draws. residual: attention rollout's residual weight.
  """

  target: int | None = None
  position: int | None = None
  baseline: str = 'black'
  steps: int = integrated.DEFAULT_STEPS
  noise_level: float = 0.15
  num_samples: int = 32
  layer: str | None = None
  batch_steps: int | None = None
  seed: int = 0
  residual: float = 0.5
  num_background: int = 50
  shap_samples: int = 0


@dataclasses.dataclass(frozen=True)
class Method:
  kinds: tuple[str, ...]
  models: tuple[str, ...] | None  # None = any model of those kinds
  fn: Callable[..., Arrays]
  about: str


METHODS: dict[str, Method] = {}


def _method(name: str, kinds: tuple[str, ...], about: str, models: tuple[str, ...] | None = None):
  def add(fn):
    METHODS[name] = Method(kinds, models, fn, about)
    return fn

  return add


def methods_for(run: Run) -> list[str]:
  """The methods that apply to `run`'s model and inputs."""
  return [
    n
    for n, m in METHODS.items()
    if run.kind in m.kinds and (m.models is None or run.model_name in m.models)
  ]


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Batch:
  """x: (B, ...) model inputs on the run's mesh (token ids for text), target (B,), context."""

  x: jax.Array
  target: jax.Array
  context: dict[str, jax.Array]
  labels: np.ndarray | None


def _batch(run: Run, inputs: Any, indices: Sequence[int] | None, opts: Options) -> Batch:
  labels = None
  extra: dict[str, np.ndarray] = {}
  if indices is not None:
    rows = run.eval_rows(indices)
    x = run.check_inputs(rows['inputs'])
    labels = rows.get('label')
    if 'segment_ids' in rows:
      extra['segment_ids'] = rows['segment_ids'].astype(np.int32)
  elif isinstance(inputs, str) or (
    isinstance(inputs, list | tuple) and inputs and isinstance(inputs[0], str)
  ):
    x = run.encode_text([inputs] if isinstance(inputs, str) else list(inputs))
  elif inputs is None:
    raise UserError('give inputs to explain: eval-split indices, an array, an image or a text')
  else:
    x = run.check_inputs(inputs)
  context: dict[str, Any] = dict(extra)
  if run.kind == 'text':
    if opts.position is None:
      pos = run.default_positions(x)
    else:
      if not -x.shape[1] <= opts.position < x.shape[1]:
        raise UserError(
          f'--position={opts.position} is outside the {x.shape[1]} tokens; give 0..{x.shape[1] - 1}'
        )
      pos = np.full(len(x), opts.position % x.shape[1], np.int32)
    context['position'] = pos
    context['tokens'] = x
  context = run.to_device(context) if context else {}
  xd = run.to_device(x)
  if opts.target is None:
    scorer_x = text.embeddings(run.variables, xd) if run.kind == 'text' else xd
    target = predicted_targets(run.scorer, run.variables, scorer_x, context)
  else:
    target = run.to_device(np.full(len(x), opts.target, np.int32))
  ctx = {k: v for k, v in context.items() if k != 'tokens'}
  return Batch(xd, target, ctx, labels)


def _host(tree: Any) -> Any:
  return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)


def _common(run: Run, b: Batch) -> Arrays:
  out = {'inputs': np.asarray(jax.device_get(b.x)), 'target': np.asarray(jax.device_get(b.target))}
  if b.labels is not None:
    out['label'] = np.asarray(b.labels)
  return out


def _text_context(b: Batch) -> dict[str, jax.Array]:
  return dict(b.context, tokens=b.x)


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------
@_method('saliency', ('image', 'tabular'), 'vanilla gradient d score / d input')
def _saliency(run: Run, b: Batch, o: Options) -> Arrays:
  a = gradients.saliency(run.scorer, run.variables, b.x, b.target, b.context)
  return {'attributions': _host(a)}


@_method('grad_x_input', ('image', 'tabular', 'text'), 'gradient x input (text: x embedding)')
def _grad_x_input(run: Run, b: Batch, o: Options) -> Arrays:
  if run.kind == 'text':
    a = text.token_gradient_x_input(run.scorer, run.variables, b.x, b.target, b.context)
  else:
    a = gradients.gradient_x_input(run.scorer, run.variables, b.x, b.target, b.context)
  return {'attributions': _host(a)}


@_method('smoothgrad', ('image', 'tabular'), 'SmoothGrad: mean gradient over noisy copies')
def _smoothgrad(run: Run, b: Batch, o: Options) -> Arrays:
  a = gradients.smoothgrad(
    run.scorer,
    run.variables,
    b.x,
    b.target,
    b.context,
    jax.random.key(o.seed),
    o.noise_level,
    o.num_samples,
    o.batch_steps,
  )
  return {'attributions': _host(a)}


@_method('guided_backprop', ('image',), 'guided backpropagation (CNN)', models=('cnn',))
def _guided(run: Run, b: Batch, o: Options) -> Arrays:
  if run.exp.model.batch_norm:
    raise UserError(
      '--method=guided_backprop needs a CNN without batch_norm (every hidden conv feeds a ReLU)'
    )
  a = gradients.guided_backprop(run.scorer, run.variables, b.x, b.target, b.context)
  return {'attributions': _host(a)}


@_method('integrated_gradients', ('image', 'tabular', 'text'), 'integrated gradients')
def _ig(run: Run, b: Batch, o: Options) -> Arrays:
  if o.steps < 1:
    raise UserError(f'--steps={o.steps} must be >= 1')
  if run.kind == 'text':
    if o.baseline not in text.TEXT_BASELINES:
      raise UserError(
        f'--baseline={o.baseline!r} does not apply to text; use one of '
        f'{", ".join(text.TEXT_BASELINES)}'
      )
    pad = run.tokenizer.pad if run.tokenizer is not None else None
    base = text.baseline_embeddings(run.variables, b.x, o.baseline, pad)
    per_token, full = text.token_integrated_gradients(
      run.scorer, run.variables, b.x, b.target, b.context, base, o.steps, o.batch_steps
    )
    total, diff = integrated.completeness_gap(
      run.scorer,
      run.variables,
      text.embeddings(run.variables, b.x),
      b.target,
      _text_context(b),
      base,
      full,
    )
    return {'attributions': _host(per_token), 'completeness': _host(jnp.stack([total, diff], 1))}
  base = integrated.make_baseline(b.x, o.baseline, rng=jax.random.key(o.seed))
  a = integrated.integrated_gradients(
    run.scorer, run.variables, b.x, b.target, b.context, base, o.steps, o.batch_steps
  )
  total, diff = integrated.completeness_gap(
    run.scorer, run.variables, b.x, b.target, b.context, base, a
  )
  return {
    'attributions': _host(a),
    'baseline': _host(base),
    'completeness': _host(jnp.stack([total, diff], 1)),
  }


@_method('gradcam', ('image',), 'Grad-CAM at the last feature map', models=gradcam.MODELS)
def _gradcam(run: Run, b: Batch, o: Options) -> Arrays:
  layer = o.layer
  if layer is None:
    layers = gradcam.feature_map_layers(run.exp.model, run.variables, b.x)
    layer = layers[-1]
  maps = gradcam.gradcam(run.scorer, run.variables, b.x, b.target, b.context, layer)
  from bigjax.explain import images

  maps = _host(maps)
  return {
    'maps': maps,
    'upsampled': images.upsample(maps, b.x.shape[1:3]),
    'layer': np.array(layer),
  }


@_method(
  'attention', ('image', 'text'), 'attention maps per layer and head', models=('vit', 'gpt', 'bert')
)
def _attention(run: Run, b: Batch, o: Options) -> Arrays:
  maps = attention.attention_maps(run.scorer, run.variables, b.x, b.context)
  return {'attention': _host(maps)}


@_method('rollout', ('image', 'text'), 'attention rollout', models=('vit', 'gpt', 'bert'))
def _rollout(run: Run, b: Batch, o: Options) -> Arrays:
  maps = attention.attention_maps(run.scorer, run.variables, b.x, b.context)
  r = _host(attention.rollout(maps, o.residual))
  out = {'rollout': r}
  if run.model_name == 'vit':  # the class token's (or the mean) row over the patches
    model = run.exp.model
    h, w = (s // model.patch_size for s in b.x.shape[1:3])
    row = r[:, 0, 1:] if model.pool == 'cls' else r.mean(1)
    from bigjax.explain import images

    out['patch_map'] = row.reshape(len(r), h, w)
    out['upsampled'] = images.upsample(out['patch_map'], b.x.shape[1:3])
  return out


@_method('next_token', ('text',), "GPT's next-token distribution", models=('gpt',))
def _next_token(run: Run, b: Batch, o: Options) -> Arrays:
  probs = _host(text.next_token_distribution(run.scorer, run.variables, b.x, b.context['position']))
  return {'probs': probs, 'top_tokens': np.argsort(-probs, axis=-1)[:, :10]}


@_method('shap', ('tabular',), 'Kernel SHAP values (shap library) and IG for comparison')
def _shap(run: Run, b: Batch, o: Options) -> Arrays:
  scorer, variables = run.scorer, run.variables
  target = np.asarray(jax.device_get(b.target))
  if len(set(target.tolist())) > 1 and run.exp.model.num_outputs > 1:
    raise UserError('--method=shap explains one class at a time; give --target=CLASS')
  t = int(target[0]) if run.exp.model.num_outputs > 1 else 1  # binary: the positive class's logit
  jitted = jax.jit(lambda rows: scorer(variables, rows, jnp.full(rows.shape[:1], t), {}))
  background = run.exp.train_arrays['inputs']
  values, base_value = tabular.shap_values(
    tabular.device_score_fn(jitted),
    np.asarray(jax.device_get(b.x)),
    np.asarray(background, np.float32),
    num_background=o.num_background,
    nsamples=o.shap_samples or 'auto',
    seed=o.seed,
  )
  tt = run.to_device(np.full(len(target), t, np.int32))
  base = jnp.zeros_like(b.x)
  ig = _host(
    integrated.integrated_gradients(
      scorer, variables, b.x, tt, b.context, base, o.steps, o.batch_steps
    )
  )
  agree = tabular.rank_agreement(values, ig)
  return {
    'shap_values': values,
    'shap_base_value': np.array(base_value),
    'integrated_gradients': ig,
    'spearman_global': np.array(agree['global']),
    'spearman_per_example': np.array(agree['per_example']),
    'top5_overlap': np.array(agree['top5_overlap']),
    'feature_names': np.array(feature_names(run)),
  }


def feature_names(run: Run) -> list[str]:
  """Names of a tabular run's features (scikit-learn's for breast_cancer, else 'feature i')."""
  n = run.input_shape[0]
  if run.exp.config.data.name == 'breast_cancer':
    from sklearn.datasets import load_breast_cancer

    return [str(s) for s in load_breast_cancer().feature_names]
  return [f'feature {i}' for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Entry
# ----------------------------------------------------------------------------------------------
def explain(
  run: Run,
  method: str,
  inputs: Any = None,
  *,
  indices: Sequence[int] | None = None,
  **options: Any,
) -> Arrays:
  """Runs `method` on `run` for `inputs` (an array (B, ...) or one example, a text string or list
  of strings) or the eval-split rows `indices`; options: the fields of `Options`.

  Returns numpy arrays: always 'inputs' (B, ...) (token ids for text) and 'target' (B,), plus
  the method's: 'attributions' (B, ...) [(B, T) for text], 'completeness' (B, 2) = (sum of
  attributions, f(x) - f(baseline)) for integrated gradients, 'maps' (B, h, w) and 'upsampled'
  (B, H, W) for Grad-CAM, 'attention' (B, L, N, T, S), 'rollout' (B, T, T), 'probs' (B, V),
  'shap_values' (B, F) with 'integrated_gradients' (B, F) and their rank correlations.
  """
  if method not in METHODS:
    raise UserError(
      f'--method={method!r} is unknown; for this run use one of {", ".join(methods_for(run))}'
    )
  if method not in methods_for(run):
    m = METHODS[method]
    needs = ', '.join(m.models) if m.models else f'{"/".join(m.kinds)} inputs'
    raise UserError(
      f'--method={method} does not apply to {run.describe()} (it needs {needs}); use one of '
      f'{", ".join(methods_for(run))}'
    )
  try:
    opts = Options(**options)
  except TypeError as e:
    raise UserError(f'unknown explain option ({e}); see bigjax.explain.Options') from None
  b = _batch(run, inputs, indices, opts)
  return {**_common(run, b), **METHODS[method].fn(run, b, opts)}
