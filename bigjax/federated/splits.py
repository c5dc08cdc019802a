"""Client splits: which training examples each simulated client holds (config.federated.split).

Each split is a function (labels (N,) int, K clients, config.federated, seed) -> K index arrays
that together hold every example exactly once, picked by name through `SPLITS`:
  iid        a seed-fixed permutation cut into K near-equal parts.
  shards     McMahan et al. 2017's pathological non-IID split: the examples sorted by label, cut
             into K * shards_per_client shards, each client given shards_per_client of them at
             random. Each label's run is cut on its own (shards per label in proportion to its
             count), so no shard mixes two labels and a client holds at most shards_per_client.
  dirichlet  label skew (Hsu et al. 2019): for each label, the fraction of its examples each
             client gets is drawn from Dir(alpha * 1_K); small alpha = a few labels per client.
"""

from __future__ import annotations

import numpy as np

from bigjax import registry
from bigjax.errors import UserError

SPLITS = registry.Registry('client splits', 'config.federated.split')
_TAG = 0xFED5  # keeps the splits' random streams apart from the other (seed, ...) streams
DIRICHLET_TRIES = 100  # draws of a Dirichlet split before giving up on every client non-empty


@SPLITS.register('iid')
def iid(labels: np.ndarray, clients: int, cfg, seed: int) -> list[np.ndarray]:
  """K near-equal parts of a seed-fixed permutation of range(N)."""
  del cfg
  perm = np.random.default_rng([seed, _TAG, 0]).permutation(len(labels))
  return [np.sort(part) for part in np.array_split(perm, clients)]


def _shards_per_label(counts: np.ndarray, total: int) -> np.ndarray:
  """`total` shards over the labels in proportion to `counts` (largest remainder), >= 1 each."""
  share = counts / counts.sum() * (total - len(counts))
  out = 1 + np.floor(share).astype(int)
  left = total - out.sum()
  out[np.argsort(-(share - np.floor(share)), kind='stable')[:left]] += 1
  return out


@SPLITS.register('shards')
def shards(labels: np.ndarray, clients: int, cfg, seed: int) -> list[np.ndarray]:
  """Sort by label, cut into K * shards_per_client single-label shards, deal them out at random."""
  total = clients * cfg.shards_per_client
  values, counts = np.unique(labels, return_counts=True)
  if total < len(values):
    raise UserError(
      f'config.federated.split=shards: clients x shards_per_client = {clients} x '
      f'{cfg.shards_per_client} = {total} shards cannot keep the {len(values)} labels apart; '
      'raise config.federated.clients or shards_per_client'
    )
  pieces = []
  for value, n_shards in zip(values, _shards_per_label(counts, total)):
    if n_shards > counts[values == value][0]:
      raise UserError(
        f'config.federated.split=shards: label {value} has {counts[values == value][0]} examples '
        f'for {n_shards} shards; lower config.federated.clients or shards_per_client'
      )
    pieces += np.array_split(np.flatnonzero(labels == value), n_shards)
  order = np.random.default_rng([seed, _TAG, 1]).permutation(total)
  per = cfg.shards_per_client
  return [
    np.sort(np.concatenate([pieces[j] for j in order[k * per : (k + 1) * per]]))
    for k in range(clients)
  ]


@SPLITS.register('dirichlet')
def dirichlet(labels: np.ndarray, clients: int, cfg, seed: int) -> list[np.ndarray]:
  """Each label's examples split over the K clients in Dir(alpha) proportions; redrawn (up to
  DIRICHLET_TRIES times, from the same seed) until no client is empty."""
  rng = np.random.default_rng([seed, _TAG, 2])
  values = np.unique(labels)
  for _ in range(DIRICHLET_TRIES):
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for value in values:
      idx = rng.permutation(np.flatnonzero(labels == value))
      cuts = (np.cumsum(rng.dirichlet(np.full(clients, cfg.alpha)))[:-1] * len(idx)).astype(int)
      for k, piece in enumerate(np.split(idx, cuts)):
        parts[k].append(piece)
    out = [np.sort(np.concatenate(p)) for p in parts]
    if min(len(p) for p in out) > 0:
      return out
  raise UserError(
    f'config.federated.split=dirichlet: with alpha={cfg.alpha} some of the {clients} clients got no '
    f'examples in {DIRICHLET_TRIES} draws; raise config.federated.alpha or lower clients'
  )


def split(labels: np.ndarray, cfg, seed: int) -> list[np.ndarray]:
  """config.federated -> the K clients' example indices (each sorted; together range(N) once).

  labels: (N,) int; UserError when there are more clients than examples or the split is unknown."""
  fn = SPLITS.get(cfg.split)
  labels = np.asarray(labels).reshape(len(labels), -1)[:, 0]
  if cfg.clients > len(labels):
    raise UserError(
      f'config.federated.clients={cfg.clients} is more than the {len(labels)} training examples; '
      'every client needs at least one: lower config.federated.clients'
    )
  return fn(labels, cfg.clients, cfg, seed)
