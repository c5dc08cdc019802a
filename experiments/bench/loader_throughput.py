"""Loader and training throughput of bigjax's grain pipeline, side by side in one run.

  python experiments/bench/loader_throughput.py --images=runs/synthetic_images [--rounds=3] --out
  python experiments/bench/loader_throughput.py --images=runs/synthetic_small --smoke   # < 2 min

1. Loader alone, ImageNet training transforms at 224 px (JPEG decode, inception crop, flip) on
   one core (config.data.threads=1, workers=0), images/s: bigjax's TrainBatches.iterate against a
   minimal hand-written grain loop (MapDataset.source -> shuffle -> random_map(the same decode and
   crop functions) -> batch) over the same array_record files.
2. Loader alone, LM windows of Shakespeare's train split (seq_len 256, batch 64), tokens/s, each
   against a hand-written grain loop over the same windows: (a) the 'lm' view's host arrays
   (config.data.view='lm', load='memory'), (b) packed windows (config.data.pack: PackedWindows
   over a uint16 token store on disk, with segment ids and positions).
3. Training examples/s, mnist_cnn (mnist5k) and gpt_shakespeare:size=small: the same compiled step
   fed by today's path (exp.device_batches: grain, device prefetch) and by the previous
   in-memory TrainBatches (rebuilt here from its source) with exp.to_global per step.
Rounds alternate; medians are reported. Each row is printed as it is measured; --out writes the
table (with the machine's description) to experiments/bench/results/loader_throughput_<date>.md
(or to --out=PATH). --smoke: 1 round of a few batches and the smoke-size configs, to check the
script runs (its numbers mean nothing).
"""

import argparse
import os
import tempfile
import time

import numpy as np

import harness

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


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
  """Appends a table row and prints it at once (medians over the rounds; ratio = bigjax /
  reference)."""
  a, b = np.median([x for x, _ in r]), np.median([y for _, y in r])
  rows.append(f'| {what} | {a:,.0f} | {b:,.0f} | {a / b:.3f} |')
  print(rows[-1], flush=True)


def rate(fn, n):
  t = time.perf_counter()
  fn()
  return n / (time.perf_counter() - t)


def _drain(batches):
  def run():
    for _ in batches():
      pass

  return run


def _first(dataset, n):
  """Reads n batches of a hand-written grain MapDataset (repeated: epochs do not run out) through
  one reader thread."""
  import grain

  read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)

  def run():
    for i, _ in enumerate(dataset.to_iter_dataset(read)):
      if i + 1 == n:
        break

  return run


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
    .repeat()
    .random_map(transform, seed=0)
    .batch(32, drop_remainder=True)
  )
  return _drain(lambda: ours.iterate(0, batches)), _first(hand, batches)


def lm_view_loaders(batches, seq_len=256, batch_size=64):
  """The 'lm' view: Shakespeare's train split read whole into (N, seq_len + 1) host arrays."""
  import grain

  from bigjax import config_lib, experiment
  from bigjax.data import loader

  config = config_lib.load_config_file('gpt_shakespeare:size=small')
  config.data.seq_len = seq_len
  train, _, _ = experiment.load_data(config, experiment.tokenizer_for(config))
  ours = loader.TrainBatches(train, batch_size, 0)
  hand = grain.MapDataset.source(train['inputs']).shuffle(seed=0).repeat().batch(batch_size)
  return _drain(lambda: ours.iterate(0, batches)), _first(hand, batches)


def packed_loaders(batches, store_dir, seq_len=256, batch_size=64):
  """Packed windows (config.data.pack) of Shakespeare's train split: its works tokenized (bytes)
  into a uint16 token store once, then PackedWindows read per window."""
  import grain

  from bigjax.data import loader, packing, text, tokenizers

  texts, _ = text.load_texts('shakespeare', 'train')
  packing.write_store(store_dir, map(tokenizers.encode, texts), tokenizers.VOCAB_SIZE, 'bench')
  windows = packing.PackedWindows(store_dir, seq_len, 'bench')
  ours = loader.TrainBatches(windows, batch_size, 0)
  hand = grain.MapDataset.source(windows).shuffle(seed=0).repeat().batch(batch_size)
  return _drain(lambda: ours.iterate(0, batches)), _first(hand, batches)


def training_rates(name, steps):
  import jax

  from bigjax import config_lib, experiment

  config = config_lib.load_config_file(name)
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


def write_table(path, command, rows):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    f.write(f'# Loader throughput\n\n`{command}`\n\n{harness.machine_info()}\n\n')
    f.write('\n'.join(rows) + '\n')
  print(f'wrote {path}')


def main():
  import sys

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', required=True, help='a make_synthetic_images.py folder')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--image_batches', type=int, default=20)
  parser.add_argument('--lm_batches', type=int, default=500)
  parser.add_argument('--train_steps', type=int, default=100)
  parser.add_argument('--smoke', action='store_true', help='a few batches, to check it runs')
  default_out = os.path.join(RESULTS, f'loader_throughput_{time.strftime("%Y-%m-%d")}.md')
  parser.add_argument('--out', nargs='?', const=default_out, help='write the table (markdown)')
  args = parser.parse_args()
  trainings = ('mnist_cnn', 'gpt_shakespeare:size=small')
  if args.smoke:
    args.rounds, args.image_batches, args.lm_batches, args.train_steps = 1, 2, 20, 3
    trainings = ('mnist_cnn:smoke', 'gpt_shakespeare:smoke')
  rows = ['| measurement | bigjax | reference | ratio |', '| --- | --- | --- | --- |']
  print('\n'.join(rows), flush=True)
  images_dir = os.path.abspath(args.images)
  ours, hand = image_loaders(images_dir, args.image_batches)
  n = 32 * args.image_batches
  r = [(rate(ours, n), rate(hand, n)) for _ in range(args.rounds)]
  report(rows, 'ImageNet train transforms, 224 px, 1 core (images/s)', r)
  tokens = args.lm_batches * 64 * 256
  ours, hand = lm_view_loaders(args.lm_batches)
  r = [(rate(ours, tokens), rate(hand, tokens)) for _ in range(args.rounds)]
  report(rows, "LM windows, 'lm' view, Shakespeare seq 256 x 64 (tokens/s)", r)
  with tempfile.TemporaryDirectory() as tmp:
    ours, hand = packed_loaders(args.lm_batches, os.path.join(tmp, 'store'))
    r = [(rate(ours, tokens), rate(hand, tokens)) for _ in range(args.rounds)]
  report(rows, 'LM windows, packed (PackedWindows), Shakespeare seq 256 x 64 (tokens/s)', r)
  for name in trainings:
    new, old, bs = training_rates(name, args.train_steps)
    n = bs * args.train_steps
    r = [(rate(new, n), rate(old, n)) for _ in range(args.rounds)]
    report(rows, f'training {name} (examples/s): new vs old path', r)
  if args.out:
    write_table(args.out, ' '.join(['python', *sys.argv]), rows)


if __name__ == '__main__':
  main()
