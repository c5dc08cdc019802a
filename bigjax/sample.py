"""Generate text from a trained GPT run.

  python -m bigjax.sample --workdir=runs/gpt_shakespeare --prompt="ROMEO." --max_new_tokens=300 \
      [--temperature=0.8 --top_k=40 --top_p=1.0 --seed=0]

Reads the run's config.json and newest checkpoint, encodes the prompt with the byte tokenizer and
prints the prompt followed by the sampled continuation.
"""
import json
import os
import sys

import ml_collections
import numpy as np
from absl import app, flags, logging

from bigjax import checkpoint, registry
from bigjax.data import text
from bigjax.errors import UserError
from bigjax.models import gpt

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Workdir of a finished or running GPT run.')
flags.DEFINE_string('prompt', '\n', 'Text to continue.')
flags.DEFINE_integer('max_new_tokens', 300, 'Bytes to generate.')
flags.DEFINE_float('temperature', 0.8, '0 = greedy.')
flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens (0 = all).')
flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling threshold (1 = off).')
flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def sample(workdir, prompt, **kwargs):
  """Returns prompt + generated text from the newest checkpoint in `workdir` (a GPT run)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'--workdir={workdir} holds no config.json; give the workdir of a GPT run')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.model.name != 'gpt':
    raise UserError(f'{workdir} is a {config.model.name!r} run; sampling needs a gpt run')
  model = registry.load('models', 'gpt')(**config.model.kwargs)
  _, state = checkpoint.load_latest(os.path.join(workdir, 'checkpoints'))
  d = config.data
  tokenizer = text.dataset_tokenizer(d.name, d.get('tokenizer', 'bytes'), d.get('vocab_size', 0),
                                     d.get('data_dir'), d.train_split)
  out = gpt.generate(model, state['params'], tokenizer.encode(prompt)[None], **kwargs)
  return prompt + tokenizer.decode(np.asarray(out)[0])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    print(sample(FLAGS.workdir, FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens,
                 temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                 seed=FLAGS.seed))
  except UserError as e:
    print(f'bigjax: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
