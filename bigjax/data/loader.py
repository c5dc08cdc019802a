"""Batches by step with grain: a random-access source -> `grain.MapDataset` -> batch(step).

Train batches: element j of this process's `MapDataset` is row k = j mod B/P of step s = j div B/P.
Step s of epoch e = s div S (S = N div B steps per epoch, the remainder dropped) takes positions
(s mod S) * B + [0, B) of the epoch's permutation `default_rng([seed, e]).permutation(N)` (the
permutation bigjax has always used, so batches are bitwise those of earlier versions; above
`INDEX_SHUFFLE_ABOVE` records grain's O(1)-memory `index_shuffle` replaces it), and process p reads
only its rows p * B/P + [0, B/P). The record is read from the source and turned into an example by
the transform (a grain map operation; random transforms get a generator seeded by (seed, step,
global row)), then grain batches B/P examples. So `batch(s)` is a pure function of (seed, s): a
resumed run reads step s directly (O(1)), whatever the number of processes or workers.

`iterate(start, stop)` streams steps start..stop-1 through grain's thread prefetch
(`config.data.threads`, `config.data.prefetch`) and, with `config.data.workers` > 0, worker
processes (`mp_prefetch`); `device_iterator` moves each batch to the devices in a background thread
while the current step runs (`config.data.device_prefetch` batches ahead).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import dataclasses
import math
from typing import Any

import grain
import jax
import numpy as np

from bigjax.data.sources import Source
from bigjax.errors import DataError

# Above this many records an epoch's permutation is not materialised (8 bytes a record) but
# computed per index by grain's index_shuffle (a different, equally uniform permutation).
INDEX_SHUFFLE_ABOVE = 1 << 25
# Rounds of grain's index_shuffle (its own default for MapDataset.shuffle).
_SHUFFLE_ROUNDS = 4

Example = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Transform:
  """A per-example grain map operation: fn(record, rng, index) -> example, with rng a
  np.random.Generator keyed by (seed, step, global row) when `random` (training only), else None;
  index is the record's index in the source (for error messages)."""

  fn: Callable[[Example, np.random.Generator | None, int], Example]
  random: bool = False


@dataclasses.dataclass(frozen=True)
class Options:
  """How grain reads: worker processes (0 = in this process), reader threads, host batches
  buffered ahead, and batches moved to the devices ahead of the running step."""

  workers: int = 0
  threads: int = 1
  prefetch: int = 2
  device_prefetch: int = 1


class ArraySource:
  """Host arrays {key: (N, ...)} as a grain source: [i] -> {key: row i}; `rows(indices)` reads
  many rows with one numpy gather per key."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self.arrays = dict(arrays)
    self._len = len(next(iter(self.arrays.values())))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> Example:
    return {k: v[index] for k, v in self.arrays.items()}

  def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[indices] for k, v in self.arrays.items()}


def as_source(data: Source | Mapping[str, np.ndarray]) -> Source:
  return ArraySource(data) if isinstance(data, Mapping) else data


def _process_rows(batch_size: int) -> tuple[int, int]:
  """(first global row of this process, rows per process) of a global batch."""
  procs = jax.process_count()
  return jax.process_index() * batch_size // procs, batch_size // procs


class _Permutation:
  """perm(epoch)[position] for a split of n records, seeded by (seed, epoch).

  Shared by grain's reader threads: the cached epoch and its permutation are one tuple, read once
  and replaced whole, so a thread never pairs one epoch with another epoch's permutation (threads
  that meet a new epoch at once may each compute it: the same array)."""

  def __init__(self, n: int, seed: int):
    self.n, self.seed = n, seed
    self._cached: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

  def _epoch_permutation(self, epoch: int) -> np.ndarray:
    cached_epoch, perm = self._cached
    if cached_epoch != epoch:  # one epoch's permutation held at a time
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
      self._cached = (epoch, perm)
    return perm

  def _shuffled(self, epoch: int, position: int) -> int:
    from grain import experimental

    seed = int(np.random.default_rng([self.seed, epoch]).integers(1 << 31))
    return experimental.index_shuffle(position, self.n - 1, seed, _SHUFFLE_ROUNDS)

  def __call__(self, epoch: int, position: int) -> int:
    if self.n > INDEX_SHUFFLE_ABOVE:
      return self._shuffled(epoch, position)
    return int(self._epoch_permutation(epoch)[position])

  def take(self, epoch: int, positions: np.ndarray) -> np.ndarray:
    """perm(epoch)[positions] for an array of positions."""
    if self.n > INDEX_SHUFFLE_ABOVE:
      return np.asarray([self._shuffled(epoch, int(p)) for p in positions], np.int64)
    return self._epoch_permutation(epoch)[positions]


def _iterate(dataset: grain.MapDataset, options: Options) -> grain.IterDataset:
  read = grain.ReadOptions(num_threads=options.threads, prefetch_buffer_size=options.prefetch)
  stream = dataset.to_iter_dataset(read)
  if options.workers > 0:
    from absl import flags

    # grain's worker processes read its absl flags (defaults); bigjax parses its own flags into a
    # private FlagValues, so the global ones are marked parsed here, as grain's docs advise.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=options.workers))
  return stream


class TrainBatches:
  """Process-local training batches, a pure function of the step.

  data: a source (sources.Source) or host arrays {'inputs': (N, ...), 'label': (N,), ...};
  batch_size: the global batch size B; transform: how a record becomes an example (None: records
  are examples already). `batch(step)` returns this process's rows {'inputs': (B/P, ...), ...}.
  """

  def __init__(
    self,
    data: Source | Mapping[str, np.ndarray],
    batch_size: int,
    seed: int,
    transform: Transform | None = None,
    options: Options = Options(),
  ):
    self.source = as_source(data)
    self.batch_size, self.seed, self.transform, self.options = batch_size, seed, transform, options
    n = len(self.source)
    self.steps_per_epoch = n // batch_size
    if self.steps_per_epoch == 0:
      raise DataError(
        f'config.batch_size={batch_size} is larger than the training split '
        f'({n} examples); lower config.batch_size'
      )
    self._first_row, self._local = _process_rows(batch_size)
    self._perm = _Permutation(n, seed)
    steps = 1 << 40  # more steps than any run takes: grain's range is lazy
    if transform is None and isinstance(self.source, ArraySource):
      # Host arrays without a per-example transform: one numpy gather per step. Reading 64 rows
      # one by one through grain costs ~4 ms a batch here (mnist5k), the gather ~0.05 ms.
      self.dataset = grain.MapDataset.range(steps).map(self._gather)
    else:
      self.dataset = (
        grain.MapDataset.range(steps * self._local)
        .map(self._example)
        .batch(self._local, drop_remainder=True)
      )

  def _index(self, step: int, row: int) -> int:
    epoch, i = divmod(step, self.steps_per_epoch)
    return self._perm(epoch, i * self.batch_size + row)

  def _gather(self, step: int) -> dict[str, np.ndarray]:
    assert isinstance(self.source, ArraySource)
    epoch, i = divmod(step, self.steps_per_epoch)
    start = i * self.batch_size + self._first_row
    return self.source.rows(self._perm.take(epoch, np.arange(start, start + self._local)))

  def _example(self, j: int) -> Example:
    step, k = divmod(j, self._local)
    row = self._first_row + k
    index = self._index(step, row)
    record = self.source[index]
    if self.transform is None:
      return record
    # Keyed by the GLOBAL row, not grain's process-local element index (what
    # MapDataset.random_map would use), so 1 and 2 processes augment identically.
    rng = np.random.default_rng([self.seed, step, row]) if self.transform.random else None
    return self.transform.fn(record, rng, index)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of step `step`'s global batch."""
    return self.dataset[step]

  def iterate(self, start: int, stop: int) -> grain.IterDataset:
    """Steps start..stop-1 in order, read ahead by threads and worker processes (Options)."""
    return _iterate(self.dataset[start:stop], self.options)


class EvalBatches:
  """Process-local eval batches covering every example of a split once, in order.

  The last batch is padded (with the last example) to batch_size; batch['mask'] (B/P,) is 1.0
  on real examples. label_key: the record feature `labels()` returns (None: no labels).
  """

  def __init__(
    self,
    data: Source | Mapping[str, np.ndarray],
    batch_size: int,
    transform: Transform | None = None,
    options: Options = Options(),
    label_key: str | None = 'label',
  ):
    self.source = as_source(data)
    self.batch_size, self.transform, self.options = batch_size, transform, options
    self.label_key = label_key
    self.num_examples = len(self.source)
    self._first_row, self._local = _process_rows(batch_size)
    num_batches = math.ceil(self.num_examples / batch_size)
    if transform is None and isinstance(self.source, ArraySource):
      self.dataset = grain.MapDataset.range(num_batches).map(self._gather)
    else:
      self.dataset = (
        grain.MapDataset.range(num_batches * self._local)
        .map(self._example)
        .batch(self._local, drop_remainder=True)
      )
    self._labels: np.ndarray | None = None

  def _positions(self, b: int) -> np.ndarray:
    start = b * self.batch_size + self._first_row
    return np.arange(start, start + self._local)

  def _gather(self, b: int) -> dict[str, np.ndarray]:
    assert isinstance(self.source, ArraySource)
    positions = self._positions(b)
    batch = self.source.rows(np.minimum(positions, self.num_examples - 1))
    batch['mask'] = (positions < self.num_examples).astype(np.float32)
    return batch

  def _example(self, j: int) -> Example:
    b, k = divmod(j, self._local)
    position = b * self.batch_size + self._first_row + k
    index = min(position, self.num_examples - 1)
    record = self.source[index]
    example = dict(record if self.transform is None else self.transform.fn(record, None, index))
    example['mask'] = np.float32(position < self.num_examples)
    return example

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    if self.options.workers or self.options.threads > 1:
      return iter(_iterate(self.dataset, self.options))
    return (self.dataset[b] for b in range(len(self.dataset)))

  def labels(self) -> np.ndarray | None:
    """The split's labels (N, ...) in order, read once and kept (from a record source only the
    label feature is taken: nothing is decoded); None without a label_key."""
    if self.label_key is None:
      return None
    if self._labels is None:
      if isinstance(self.source, ArraySource):
        self._labels = self.source.arrays.get(self.label_key)
      else:
        self._labels = np.asarray(
          [self.source[i][self.label_key] for i in range(self.num_examples)], np.int32
        )
    return self._labels


def device_iterator(
  batches: grain.IterDataset, to_global: Callable[[dict], dict], ahead: int
) -> Iterator[dict]:
  """Host batches -> global device arrays, `ahead` of them transferred by a background thread
  while the current step runs (ahead = 0: in the caller's thread)."""
  stream = batches.map(to_global)
  if ahead > 0:
    from grain import experimental

    stream = experimental.ThreadPrefetchIterDataset(stream, prefetch_buffer_size=ahead)
  return iter(stream)
