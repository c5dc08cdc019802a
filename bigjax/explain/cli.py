"""Explain a trained run's predictions: attributions and attention maps as .npz arrays and PNGs.

  bigjax-explain --workdir=runs/mnist_cnn --method=integrated_gradients --inputs=0:8 \
      [--baseline=black|blurred|noise --steps=64 --target=CLASS --outdir=DIR]
  bigjax-explain --workdir=runs/mnist_cnn --method=gradcam --inputs=digit.png
  bigjax-explain --workdir=runs/gpt_shakespeare --method=next_token --inputs="ROMEO. What"
  bigjax-explain --workdir=runs/mlp_breast_cancer --method=shap --inputs=0:20

--inputs: eval-split indices ('0,3,7' or '0:8'), an image file (.png/.jpg, the run's size) or a
.npy array, or (text runs) a text string. Methods: saliency, grad_x_input, smoothgrad,
integrated_gradients, guided_backprop (CNN), gradcam (CNN, ResNet), attention and rollout (ViT,
GPT, BERT), next_token (GPT), shap (tabular). Writes OUTDIR/METHOD.npz (the arrays of
bigjax.explain.explain) and OUTDIR/METHOD.png, OUTDIR defaulting to WORKDIR/explain.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import re

import numpy as np

from bigjax import cli
from bigjax.errors import UserError

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif')


def parse_inputs(spec: str, run) -> dict:
  """--inputs -> explain() keyword arguments: {'indices': [...]} or {'inputs': array or text}."""
  if re.fullmatch(r'\s*\d+\s*(,\s*\d+\s*)*', spec):
    return {'indices': [int(s) for s in spec.split(',')]}
  m = re.fullmatch(r'\s*(\d+)\s*:\s*(\d+)\s*', spec)
  if m:
    start, stop = int(m.group(1)), int(m.group(2))
    if stop <= start:
      raise UserError(f'--inputs={spec}: the range is empty; give START:STOP with STOP > START')
    return {'indices': list(range(start, stop))}
  if os.path.isfile(spec) and spec.lower().endswith('.npy'):
    return {'inputs': np.load(spec)}
  if os.path.isfile(spec) and spec.lower().endswith(IMAGE_SUFFIXES):
    return {'inputs': load_image(spec, run.input_shape)}
  if run.kind == 'text':
    return {'inputs': spec}
  raise UserError(
    f'--inputs={spec!r} is neither eval-split indices (0,1,2 or 0:8) nor an existing image or '
    f'.npy file; {run.describe()} takes {run.kind} inputs'
  )


def load_image(path: str, shape: tuple[int, ...]) -> np.ndarray:
  """An image file -> (1, H, W, C) uint8 in the run's channels; its size must be the run's."""
  from PIL import Image

  if len(shape) != 3:
    raise UserError(f'--inputs={path}: this run does not take images (its inputs are {shape})')
  try:
    image = Image.open(path).convert('L' if shape[2] == 1 else 'RGB')
  except OSError as e:
    raise UserError(f'--inputs={path} cannot be read as an image ({e})') from None
  x = np.asarray(image, np.uint8)
  x = x[..., None] if x.ndim == 2 else x
  if x.shape != shape:
    raise UserError(
      f'--inputs={path} is a {x.shape[1]}x{x.shape[0]} image but the run takes '
      f'{shape[1]}x{shape[0]}; resize it to that size'
    )
  return x[None]


def write_outputs(outdir: str, method: str, out: dict, run) -> list[str]:
  """Saves METHOD.npz and METHOD.png; returns their paths."""
  from bigjax.explain import images, similarity

  os.makedirs(outdir, exist_ok=True)
  npz = os.path.join(outdir, f'{method}.npz')
  np.savez(npz, **out)
  png = os.path.join(outdir, f'{method}.png')
  target = out['target']
  if run.kind == 'text':
    tok = run.tokenizer
    pieces = [[tok.decode(np.array([t])) for t in row] for row in out['inputs']]
    if method in ('attention', 'rollout'):
      maps = out['attention'][0] if method == 'attention' else out['rollout'][:1, None]
      images.save_attention_grid(png, maps, pieces[0], f'{method}: {run.describe()}')
    elif method == 'next_token':
      top = out['top_tokens'][0]
      names = [repr(tok.decode(np.array([t]))) for t in top]
      images.save_bars(png, names, {'p': out['probs'][0][top]}, 'next-token distribution')
    else:
      images.save_token_attributions(png, pieces, out['attributions'], method)
  elif run.kind == 'tabular':
    if method == 'shap':
      names = [str(n) for n in out['feature_names']]
      images.save_bars(
        png,
        names,
        {
          'mean |SHAP|': np.abs(out['shap_values']).mean(0),
          'mean |IG|': np.abs(out['integrated_gradients']).mean(0),
        },
        f'SHAP vs IG (Spearman {float(out["spearman_global"]):.2f})',
      )
    else:
      names = [f'feature {i}' for i in range(out['attributions'].shape[1])]
      images.save_bars(png, names, {'mean |attr|': np.abs(out['attributions']).mean(0)}, method)
  else:
    x = out['inputs']
    titles = [f'target {t}' for t in target]
    if method == 'attention':
      images.save_attention_grid(png, out['attention'][0], None, f'attention: {run.describe()}')
    elif 'upsampled' in out:
      images.save_image_maps(png, x, out['upsampled'], titles, method, overlay=True)
    else:
      images.save_image_maps(png, x, similarity.to_map(out['attributions']), titles, method)
  return [npz, png]


def _main(argv: Sequence[str]) -> int:
  from absl import logging

  from bigjax.explain import api, integrated
  from bigjax.explain import run as run_lib

  parser = cli.Parser('bigjax-explain', __doc__)
  parser.string('workdir', None, 'Workdir of a trained run (its newest checkpoint).', required=True)
  parser.string('method', None, 'Explanation method (see above).', required=True)
  parser.string('inputs', '0:8', 'Eval-split indices, an image/.npy file or a text string.')
  parser.string('outdir', None, 'Where METHOD.npz and METHOD.png go (default WORKDIR/explain).')
  parser.integer('target', -1, 'Class (or token id) to explain; -1 = the predicted one.')
  parser.integer('position', -1, 'Text: the position whose prediction is explained; -1 = last.')
  parser.string(
    'baseline', 'black', 'Integrated gradients baseline: black, blurred, noise (text: black, pad).'
  )
  parser.integer('steps', integrated.DEFAULT_STEPS, 'Integrated gradients Riemann steps.')
  parser.float('noise_level', 0.15, 'SmoothGrad noise, a fraction of the input range.')
  parser.integer('num_samples', 32, 'SmoothGrad noise samples.')
  parser.string('layer', None, 'Grad-CAM layer (default: the last feature map).')
  parser.integer('seed', 0, 'Seed of noise baselines, SmoothGrad and SHAP background draws.')
  fv = parser.parse(argv)
  logging.set_verbosity(logging.WARNING)
  run = run_lib.load_run(fv.workdir)
  out = api.explain(
    run,
    fv.method,
    **parse_inputs(fv.inputs, run),
    target=None if fv.target < 0 else fv.target,
    position=None if fv.position < 0 else fv.position,
    baseline=fv.baseline,
    steps=fv.steps,
    noise_level=fv.noise_level,
    num_samples=fv.num_samples,
    layer=fv.layer,
    seed=fv.seed,
  )
  outdir = fv.outdir or os.path.join(fv.workdir, 'explain')
  for path in write_outputs(outdir, fv.method, out, run):
    print(path)
  if 'completeness' in out:
    total, diff = out['completeness'].T
    err = np.abs(total - diff) / np.maximum(np.abs(diff), 1e-12)
    print(
      f'completeness: max |sum - (f(x) - f(baseline))| / |f(x) - f(baseline)| = {err.max():.4f}'
    )
  if 'spearman_global' in out:
    print(
      f'SHAP vs integrated gradients: Spearman of feature importances {float(out["spearman_global"]):.3f}'
    )
  return 0


def main(argv: Sequence[str] | None = None) -> None:
  """CLI entry: user errors print one line and exit 2."""
  cli.run(_main, argv)


if __name__ == '__main__':
  main()
