"""Generate text from a trained GPT or Llama run (with its config.peft adapter, if it has one).

  bigjax-sample --workdir=runs/gpt_shakespeare --prompt="ROMEO." --max_new_tokens=300 \
      [--temperature=0.8 --top_k=40 --top_p=1.0 --seed=0]

Reads the run's config.json and newest checkpoint, builds the same model (its data-derived fields
from the run's tokenizer, as bigjax-train does), encodes the prompt with that tokenizer and prints
the prompt followed by the sampled continuation. Generation uses the KV cache
(bigjax/models/generate.py; Llama's caches its key/value heads only); an adapter run samples with
its adapter (LoRA and the others through their interceptors, prompt / prefix tuning's virtual
tokens in front of the prompt).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bigjax import cli, experiment
from bigjax.errors import UserError

GENERATIVE = ('gpt', 'llama')  # the config.model.name of runs bigjax-sample can continue


def sample(workdir: str, prompt: str, **kwargs) -> str:
  """Returns prompt + generated text from the newest checkpoint in `workdir` (a GPT or Llama run).

  kwargs: generate's max_new_tokens, temperature, top_k, top_p, seed."""
  from bigjax.models.generate import generate

  config, tokenizer, model, params = experiment.load_run(workdir, 'a GPT or Llama run')
  if config.model.name not in GENERATIVE:
    raise UserError(
      f'{workdir} is a {config.model.name!r} run; sampling needs a run of one of '
      f'{", ".join(GENERATIVE)}'
    )
  try:
    out = generate(model, params, tokenizer.encode(prompt)[None], **kwargs)
  except ValueError as e:
    raise UserError(f'{e}; change --prompt or --max_new_tokens') from None
  return prompt + tokenizer.decode(np.asarray(out)[0])


def check_arguments(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
  """UserError naming the first sampling argument out of its range."""
  for ok, text in (
    (max_new_tokens >= 1, f'--max_new_tokens={max_new_tokens} must be >= 1'),
    (temperature >= 0, f'--temperature={temperature} must be >= 0 (0 = greedy)'),
    (top_k >= 0, f'--top_k={top_k} must be >= 0 (0 = all tokens)'),
    (0 < top_p <= 1, f'--top_p={top_p} must be in (0, 1] (1 = off)'),
  ):
    if not ok:
      raise UserError(text)


def _main(argv: Sequence[str]) -> int:
  from absl import logging

  parser = cli.Parser('bigjax-sample', __doc__)
  parser.string('workdir', None, 'Workdir of a finished or running GPT / Llama run.', required=True)
  parser.string('prompt', '\n', 'Text to continue.')
  parser.integer('max_new_tokens', 300, 'Tokens to generate.')
  parser.float('temperature', 0.8, '0 = greedy.')
  parser.integer('top_k', 0, 'Keep the k most likely tokens (0 = all).')
  parser.float('top_p', 1.0, 'Nucleus sampling threshold (1 = off).')
  parser.integer('seed', 0, 'Sampling seed.')
  fv = parser.parse(argv)
  check_arguments(fv.max_new_tokens, fv.temperature, fv.top_k, fv.top_p)
  logging.set_verbosity(logging.WARNING)
  print(
    sample(
      fv.workdir,
      fv.prompt,
      max_new_tokens=fv.max_new_tokens,
      temperature=fv.temperature,
      top_k=fv.top_k,
      top_p=fv.top_p,
      seed=fv.seed,
    )
  )
  return 0


def main(argv: Sequence[str] | None = None) -> None:
  """CLI entry: user errors print one line and exit 2."""
  cli.run(_main, argv)


if __name__ == '__main__':
  main()
