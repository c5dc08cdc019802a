"""Fine-tune BERT to classify the genre of a Shakespeare passage (comedy/tragedy/history/poem).

  bigjax-train --config=bert_genre:init=runs/bert_mlm --workdir=runs/bert_genre
  bigjax-train --config=bert_genre:init=none --workdir=runs/bert_genre_scratch

Args: init=<workdir of a configs/bert_shakespeare_mlm.py run> (default runs/bert_mlm) loads the
pretrained encoder (embeddings, stack, pooler; the classifier head starts fresh), init=none trains
the same model from scratch; hf=DIR starts from a HuggingFace BERT save_pretrained directory
instead (its architecture and tokenizer, as bert_shakespeare_mlm:hf=DIR; the classifier starts
fresh); smoke. Splits are by play, so test passages come from unseen works.
"""

import os

import ml_collections

from bigjax import config_lib

PRETRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bert_shakespeare_mlm.py')


def get_config(arg=None):
  args = config_lib.parse(arg, init='runs/bert_mlm', smoke=False, hf='')
  # The pretraining run's config, so the model shapes agree.
  pretrain_args = ','.join(
    [*(['smoke'] if args.smoke else []), *([f'hf={args.hf}'] if args.hf else [])]
  )
  config = config_lib.load_config_file(PRETRAIN + (f':{pretrain_args}' if pretrain_args else ''))
  config.data.update(view='classification', eval_split='test', eval_max_examples=0)
  config.model.kwargs.head = 'classify'  # 4 genres: build() takes the class count from the data
  config.task.name = 'sequence_classification'
  config.task.kwargs = ml_collections.ConfigDict()
  config.optim.update(lr=1e-3, warmup_steps=50)  # the same for both starts: a fair comparison
  config.num_steps = 20 if args.smoke else 600
  config.checkpoint_every = 10 if args.smoke else 300
  if args.hf:  # every tensor DIR holds (the pooler too, when it has one)
    config.init_from.update(checkpoint='', load='.*')
  else:
    config.init_from.update(
      checkpoint='' if args.init == 'none' else args.init,
      load='^embed/,^position_embed/,^segment_embed/,^embed_norm/,^stack/,^pooler/',
    )
  return config
