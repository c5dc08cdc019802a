"""Loader and training throughput of bigjax's grain pipeline, side by side in one run.

  python experiments/bench/loader_throughput.py --images=runs/synthetic_images [--rounds=3]

1. Loader alone, ImageNet training transforms at 224 px (JPEG decode, inception crop, flip) on
   one core (config.data.threads=1, workers=0), images/s: bigjax's TrainBatches.iterate against a
   minimal hand-written grain loop (MapDataset.source -> shuffle -> map(the same decode and crop
   functions) -> batch) over the same array_record files.
2. Loader alone, LM windows (Shakespeare, 'lm' view, seq_len 256, batch 64), tokens/s: bigjax
   against a hand-written grain loop over the same token windows.
3. Training examples/s, mnist_cnn (mnist5k) and gpt_shakespeare:size=small: the same compiled step
   fed by today's path (exp.device_batches: grain, device prefetch) and by the previous
   in-memory TrainBatches (bigjax/data/pipeline.py at git HEAD~ before this change, rebuilt here
   from its source) with exp.to_global per step. Rounds alternate; medians are reported.
"""

import argparse
import os
import time

import numpy as np

os.environ.setdefault('JAX_PLATFORMS', 'cpu')


class OldTrainBatches:
  """The in-memory TrainBatches bigjax used before grain (bigjax/data/pipeline.py, single process):
  the epoch's permutation default_rng([seed, epoch]) and one numpy gather per step."""

  def __init__(self, arrays, batch_size, seed):
    self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
    self.steps_per_epoch = len(arrays['inputs']) // batch_size
    self._epoch, self._perm = None, None

  def batch(self, step):
    epoch, i = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._epoch = epoch
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.arrays['inputs']))
    idx = self._perm[i * self.batch_size : (i + 1) * self.batch_size]
    return {k: v[idx] for k, v in self.arrays.items()}


def report(rows: list, what: str, r: list) -> None:
  """Appends a row and prints it at once (medians over the rounds; ratio = bigjax / reference)."""
  rows.append((what, r))
  a, b = np.median([x for x, _ in r]), np.median([y for _, y in r])
  print(f'| {what} | {a:,.0f} | {b:,.0f} | {a / b:.3f} |', flush=True)


def rate(fn, n):
  t = time.perf_counter()
  fn()
  return n / (time.perf_counter() - t)


def image_loaders(images_dir, batches):
  import grain

  from bigjax import config_lib
  from bigjax.data import images, inputs, records

  config = config_lib.load_config_file('mnist_cnn')
  config.data.update(name=f'dir:{images_dir}', image_size=224, threads=1, workers=0, prefetch=2)
  config.batch_size = 32
  ours = inputs.build(config, None, None).train
  info = records.read_info(images_dir)
  files = [os.path.join(images_dir, f) for f in info['splits']['train']['files']]

  def transform(raw, rng):
    record = records.decode(raw)
    image = images.decode(record['image'], 3, 'bench')
    return {'inputs': images.inception_crop(image, 224, rng, 3), 'label': record['label']}

  hand = (
    grain.MapDataset.source(grain.sources.ArrayRecordDataSource(files))
    .shuffle(seed=0)
    .random_map(transform, seed=0)
    .batch(32, drop_remainder=True)
  )
  read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)

  def run_ours():
    for _ in ours.iterate(0, batches):
      pass

  def run_hand():
    for i, _ in enumerate(hand.to_iter_dataset(read)):
      if i + 1 == batches:
        break

  return run_ours, run_hand


def lm_loaders(batches):
  import grain

  from bigjax import config_lib, experiment

  config = config_lib.load_config_file('gpt_shakespeare:size=small')
  config.data.seq_len = 256
  config.batch_size = 64
  tokenizer = experiment.tokenizer_for(config)
  train, _, _ = experiment.load_data(config, tokenizer)
  from bigjax.data import loader

  ours = loader.TrainBatches(train, 64, 0)
  windows = train['inputs']
  hand = grain.MapDataset.source(windows).shuffle(seed=0).batch(64, drop_remainder=True)
  read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)

  def run_ours():
    for _ in ours.iterate(0, batches):
      pass

  def run_hand():
    for i, _ in enumerate(hand.to_iter_dataset(read)):
      if i + 1 == batches:
        break

  return run_ours, run_hand, 64 * 256


def training_rates(name, arg, steps):
  import jax

  from bigjax import config_lib, experiment

  config = config_lib.load_config_file(f'{name}:{arg}' if arg else name)
  exp = experiment.build(config, jax.devices()[:1])
  step_fn = exp.compile_train_step()
  state = exp.create_state()
  old = OldTrainBatches(dict(exp.train_arrays), config.batch_size, config.seed)
  exp.total_steps = steps + 1

  def run_new():
    nonlocal state
    batches = exp.device_batches(0)
    for _ in range(steps):
      state, m = step_fn(state, next(batches))
    jax.block_until_ready(m)

  def run_old():
    nonlocal state
    for s in range(steps):
      state, m = step_fn(state, exp.to_global(old.batch(s)))
    jax.block_until_ready(m)

  run_new(), run_old()  # warm-up
  return run_new, run_old, config.batch_size


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', required=True)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--image_batches', type=int, default=20)
  parser.add_argument('--train_steps', type=int, default=100)
  args = parser.parse_args()
  print('| measurement | bigjax | reference | ratio |')
  print('| --- | --- | --- | --- |', flush=True)
  rows: list = []
  ours, hand = image_loaders(args.images, args.image_batches)
  n = 32 * args.image_batches
  r = [(rate(ours, n), rate(hand, n)) for _ in range(args.rounds)]
  report(rows, 'ImageNet train transforms, 224 px, 1 core (images/s)', r)
  ours, hand, per_batch = lm_loaders(500)
  r = [(rate(ours, 500 * per_batch), rate(hand, 500 * per_batch)) for _ in range(args.rounds)]
  report(rows, 'LM windows, Shakespeare seq 256 x 64 (tokens/s)', r)
  for name, arg in (('mnist_cnn', None), ('gpt_shakespeare', 'size=small')):
    new, old, bs = training_rates(name, arg, args.train_steps)
    n = bs * args.train_steps
    r = [(rate(new, n), rate(old, n)) for _ in range(args.rounds)]
    report(rows, f'training {name}{":" + arg if arg else ""} (examples/s): new vs old path', r)


if __name__ == '__main__':
  main()
