"""The data of each FedAvg round: which clients train, and their local batches, from (seed, round).

Round r selects m = max(1, round(C * K)) of the K clients without replacement
(`default_rng([seed, SELECT, r])`); client k's local epoch e visits its n_k examples in the order
`default_rng([seed, SHUFFLE, r, k, e]).permutation(n_k)`, in ceil(n_k / B) batches. One jitted
round needs one shape for every round and client, so each client's data is laid out as S = E *
ceil(n_max / B) steps of B rows (n_max: the largest client) with a 0/1 weight per row: a client's
last, short batch of an epoch is filled up with its own examples at weight 0, and steps after its
last one are all weight 0 (the round step skips them). The client axis is padded to a multiple of
the devices it is split over with clients of weight 0. `batch(r)` is a pure function of (seed, r),
so a resumed run reads round r directly.
"""

from __future__ import annotations

import math

import grain
import jax
import numpy as np

from bigjax.federated import splits

SELECT, SHUFFLE = 0xFED0, 0xFED1  # stream tags: (seed, tag, ...) never meets another stream
# Batch keys the round adds beside the dataset's own (the round step takes them out again).
WEIGHT, EXAMPLES, CLIENT = 'fed_weight', 'fed_examples', 'fed_client'


class RoundData:
  """Per-round client batches over host arrays {'inputs': (N, ...), 'label': (N,), ...}.

  cfg: config.federated; parallel: the number of devices the client axis is split over (the
  padded client count is a multiple of it). `batch(r)` returns this process's clients of round r:
  every dataset key as (M, S, B, ...), plus WEIGHT (M, S, B) float32 (1 = a real example),
  EXAMPLES (M,) float32 (n_k, the client's weight in the average; 0 for padding) and CLIENT (M,)
  int32 (the client's id; K + j for padding client j).
  """

  def __init__(self, arrays: dict, cfg, seed: int, parallel: int):
    self.arrays, self.cfg, self.seed = arrays, cfg, seed
    n = len(arrays['inputs'])
    labels = arrays['label'] if 'label' in arrays else np.zeros(n, np.int32)
    self.clients = splits.split(labels, cfg, seed)
    self.sizes = np.array([len(c) for c in self.clients])
    self.per_round = max(1, int(cfg.client_fraction * cfg.clients + 0.5))
    self.padded = math.ceil(self.per_round / parallel) * parallel
    n_max = int(self.sizes.max())
    self.batch_size = min(cfg.local_batch_size or n_max, n_max)
    self.local_steps = cfg.local_epochs * math.ceil(n_max / self.batch_size)
    procs, pid = jax.process_count(), jax.process_index()
    self._rows = slice(pid * self.padded // procs, (pid + 1) * self.padded // procs)
    self.dataset = grain.MapDataset.range(1 << 40).map(self.batch)  # lazy: rounds by index

  def selected(self, round_: int) -> np.ndarray:
    """The sorted ids (m,) of the clients that train in round `round_`."""
    rng = np.random.default_rng([self.seed, SELECT, round_])
    return np.sort(rng.choice(self.cfg.clients, self.per_round, replace=False))

  def _client_rows(self, round_: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(example indices (S, B), weights (S, B)) of client k in round `round_`."""
    n, b, s = int(self.sizes[k]), self.batch_size, self.local_steps
    per_epoch = math.ceil(n / b) * b
    order, weight = [], []
    for e in range(self.cfg.local_epochs):
      perm = np.random.default_rng([self.seed, SHUFFLE, round_, k, e]).permutation(n)
      order.append(np.resize(perm, per_epoch))  # the short last batch refilled from the start
      weight.append(np.arange(per_epoch) < n)
    rows = np.concatenate(order)
    full = np.resize(rows, s * b)
    w = np.zeros(s * b, np.float32)
    w[: len(rows)] = np.concatenate(weight)
    return self.clients[k][full].reshape(s, b), w.reshape(s, b)

  def batch(self, round_: int) -> dict[str, np.ndarray]:
    """This process's rows of round `round_`'s client batches (see the class doc)."""
    chosen = self.selected(round_)
    pad = self.padded - self.per_round
    ids = np.concatenate([chosen, np.full(pad, chosen[0])])  # padding repeats a real client's data
    rows = [self._client_rows(round_, int(k)) for k in ids[self._rows]]
    idx = np.stack([r[0] for r in rows])
    weight = np.stack([r[1] for r in rows])
    real = np.arange(self.padded)[self._rows] < self.per_round
    weight *= real[:, None, None]
    out = {key: value[idx] for key, value in self.arrays.items()}
    out[WEIGHT] = weight
    out[EXAMPLES] = np.where(real, self.sizes[ids[self._rows]], 0).astype(np.float32)
    client = np.concatenate([chosen, self.cfg.clients + np.arange(pad)])
    out[CLIENT] = client[self._rows].astype(np.int32)
    return out

  def iterate(self, start: int, stop: int) -> grain.IterDataset:
    """Rounds start..stop-1 in order, each built in a reader thread ahead of the running round."""
    return self.dataset[start:stop].to_iter_dataset()
