"""config.adversarial: adversarial training, the attack run inside the jitted train step.

Each step replaces the first round(fraction * B) examples of its batch (the batch order is already
a seeded shuffle) by their adversarial versions against the current parameters, then takes the
usual loss and update on the whole batch: fraction 1 is Madry et al. (2018)'s PGD training on
adversarial examples only, fraction 0.5 Goodfellow et al. (2015)'s even mix of clean and FGSM
examples. eps_warmup_steps K > 0 ramps eps linearly from 0 at step 0 to its value at step K (as
many Madry-style MNIST trainings do, so a run does not stall at chance); 0 keeps it fixed. The
attack runs with the model in eval mode (no dropout, batch-norm running statistics) on the
augmented float inputs and is not differentiated through. Its random start comes from the step's
key, so a resumed run repeats it bitwise.

Image and feature inputs are perturbed directly (images within [0, 1]). Token inputs (BERT, GPT,
Llama classifiers) are perturbed in embedding space: the output of the model's top-level `embed`
table gets a perturbation of size eps per example, which with method 'fgsm' and norm 'l2' is
Miyato et al. (2017)'s FGM for text, and with 'pgd' plain multi-step PGD on the embeddings (the
update uses the gradient at the last iterate only).

Method 'freelb' (token inputs, fraction 1) is FreeLB (Zhu et al. 2020, "FreeLB: Enhanced
Adversarial Training for Natural Language Understanding"): K = steps ascent steps of the
embedding perturbation (norm / eps / step_size as for PGD, from a random start in the ball when
random_start), and the parameter gradient is the AVERAGE of the K gradients taken at the iterates
delta_0 ... delta_{K-1}, each on the whole batch (FreeLB's gradient accumulation). It is computed
as one gradient of the mean loss over the batch repeated K times, copy t shifted by delta_t (the
deltas held constant, as FreeLB does): the same value, in one batched backward pass. The ascent
runs in eval mode like the other attacks, so with dropout the K copies get their own masks
(FreeLB reuses one mask); train metrics are over the K copies.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigjax import steps
from bigjax.errors import UserError
from bigjax.robust import attacks, objective
from bigjax.tasks import base as task_base

FIELD = 'config.adversarial'
FREELB = 'freelb'  # config.adversarial.method beyond the attacks' own (fgsm, pgd): token inputs
_STREAM = 0x616476  # folded into the step's dropout key: the attack's own random stream


def enabled(cfg) -> bool:
  """True when config.adversarial names a method."""
  return bool(cfg.method)


@contextlib.contextmanager
def shifted_embeddings(delta_BTD: jax.Array) -> Iterator[None]:
  """Inside: the model's top-level `embed` module (an nn.Embed directly under the model) returns
  its lookup plus delta_BTD (B, T, D); `embed.attend` (a tied output head) is untouched."""

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if (
      context.method_name == '__call__'
      and isinstance(module, nn.Embed)
      and tuple(module.scope.path) == ('embed',)
    ):
      return out + delta_BTD.astype(out.dtype)
    return out

  with nn.intercept_methods(interceptor):
    yield


@dataclasses.dataclass(frozen=True)
class EmbeddingShifted:
  """`model` whose apply() runs under shifted_embeddings(delta): what the train step applies for
  an adversarial text batch."""

  model: nn.Module
  delta: jax.Array

  def apply(self, *args, **kwargs):
    with shifted_embeddings(self.delta):
      return self.model.apply(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Adversarial:
  """The attack and the share of each batch it replaces; text: perturb token embeddings;
  freelb: average the parameter gradient over the attack's ascent path (module doc)."""

  attack: attacks.Attack
  fraction: float
  task: task_base.Task
  text: bool
  freelb: bool = False
  eps_warmup_steps: int = 0  # eps ramps linearly from 0 over the first steps (0 = full from 0)

  def attack_at(self, step: jax.Array | None) -> attacks.Attack:
    """The attack of train step `step` (updates done): eps (and a default step size, which
    follows eps) scaled by min(1, step / eps_warmup_steps); unchanged without a warm-up."""
    if not self.eps_warmup_steps or step is None:
      return self.attack
    scale = jnp.minimum(1.0, step.astype(jnp.float32) / self.eps_warmup_steps)
    return dataclasses.replace(self.attack, eps=self.attack.eps * scale)

  def perturb(self, model, variables: dict, batch: dict, augment, rng: jax.Array, step=None):
    """(model, batch, augment) for the train step's loss: the first round(fraction * B) examples
    of `batch` (B, ...) attacked under `variables`. Images/features: batch['inputs'] becomes the
    float, already augmented inputs (so augment becomes None). Text: the batch is unchanged and the
    model is EmbeddingShifted by the (B, T, D) perturbation (zero on the clean rows).
    augment: the step's (rng, config.augment); rng: the step's dropout key; step: () int32 the
    train step (updates done), for the eps warm-up (attack_at)."""
    b = batch['inputs'].shape[0]
    k = int(round(self.fraction * b))
    if k == 0:
      return model, batch, augment
    key = jax.random.fold_in(rng, _STREAM)
    attack = self.attack_at(step)
    head = lambda tree: jax.tree.map(lambda v: v[:k], tree)
    if not self.text:
      x = steps.prepare_inputs(batch['inputs'], *(augment or (None, None)))
      loss_fn, _ = objective.objective(model, self.task, variables, head({**batch, 'inputs': x}))
      bounds = attacks.input_bounds(batch['inputs'].dtype)
      x_adv = attacks.perturb(loss_fn, x[:k], key, attack, bounds)
      return model, {**batch, 'inputs': jnp.concatenate([x_adv, x[k:]])}, None
    tokens = batch['inputs']
    width = variables['params']['embed']['embedding'].shape[-1]
    few = head(batch)

    def shifted_loss(delta):
      outputs = steps.apply_model(EmbeddingShifted(model, delta), variables, few, train=False)
      return objective.per_example(self.task, outputs, few)[0]

    zeros = jnp.zeros((b, tokens.shape[1], width), jnp.float32)
    if self.freelb:  # k == b: the batch K times, copy t shifted by delta_t (module doc)
      path = attacks.ascent_path(shifted_loss, zeros, key, attack)  # (K, B, T, D)
      copies = path.shape[0]
      repeated = jax.tree.map(lambda v: jnp.concatenate([v] * copies), batch)
      return EmbeddingShifted(model, path.reshape(-1, *path.shape[2:])), repeated, augment
    delta = attacks.perturb(shifted_loss, zeros[:k], key, attack, None)  # from 0: the shift
    return EmbeddingShifted(model, jnp.concatenate([delta, zeros[k:]])), batch, augment


def from_config(cfg, task: task_base.Task, inputs_dtype, params) -> Adversarial | None:
  """config.adversarial -> Adversarial, or None when off; UserError naming the field for a bad
  attack (see attacks.check), fraction outside (0, 1], a task without accuracy, token inputs
  to a model without a top-level `embed` table, or 'freelb' on non-token inputs, with fraction
  < 1 or restarts > 1. params: the (abstract) parameter tree."""
  if not enabled(cfg):
    return None
  freelb = cfg.method == FREELB
  if not freelb and cfg.method not in attacks.METHODS:
    raise UserError(
      f'{FIELD}.method={cfg.method!r} is unknown; known attack methods: '
      f'{", ".join(attacks.METHODS.names())}, and {FREELB} (token inputs)'
    )
  method = 'pgd' if freelb else cfg.method  # FreeLB's ascent is PGD's
  attack = attacks.Attack(
    method, cfg.norm, cfg.eps, cfg.steps, cfg.step_size, cfg.random_start, cfg.restarts
  )
  attacks.check(attack, FIELD)
  if not 0 < cfg.fraction <= 1:
    raise UserError(
      f'{FIELD}.fraction={cfg.fraction} must be in (0, 1] (the share of each batch attacked)'
    )
  if 'accuracy' not in task.report_metrics:
    raise UserError(
      f'{FIELD} needs a classification task (one whose eval reports accuracy), not '
      f'{type(task).__module__}; unset {FIELD}.method'
    )
  dtype = np.dtype(inputs_dtype)
  text = bool(np.issubdtype(dtype, np.integer) and dtype != np.uint8)
  if text and 'embedding' not in params.get('embed', {}):
    raise UserError(
      f'{FIELD} on token inputs perturbs the model\'s top-level "embed" table, which this model '
      f'does not have; unset {FIELD}.method'
    )
  if freelb and not text:
    raise UserError(
      f"{FIELD}.method='{FREELB}' perturbs token embeddings, and these inputs are "
      f"{dtype}; use method='pgd' for image or feature inputs"
    )
  for field, value, fix in (
    ('fraction', cfg.fraction, 'set fraction=1.0 (FreeLB perturbs every example)'),
    ('restarts', cfg.restarts, 'set restarts=1 (FreeLB follows one ascent path)'),
  ):
    if freelb and value != 1:
      raise UserError(f"{FIELD}.{field}={value!r} does not fit method='{FREELB}'; {fix}")
  if cfg.eps_warmup_steps < 0:
    raise UserError(
      f'{FIELD}.eps_warmup_steps={cfg.eps_warmup_steps} must be >= 0 (0 = no warm-up)'
    )
  return Adversarial(attack, float(cfg.fraction), task, text, freelb, int(cfg.eps_warmup_steps))
