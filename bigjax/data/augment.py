"""On-device image preprocessing and augmentation, deterministic given an rng key.

All functions take and return NHWC batches `(B, H, W, C)`; they run inside the jitted train step,
so augmentation costs no host time and is reproduced exactly on resume (the key is derived from the
step).
"""

import chex
import jax
import jax.numpy as jnp


def to_float(x):
  """uint8 images in [0, 255] -> float32 in [0, 1]; float inputs pass through unchanged."""
  if jnp.issubdtype(x.dtype, jnp.integer):
    return x.astype(jnp.float32) / 255.0
  return x


def random_crop(rng, images, padding):
  """Zero-pads each side by `padding` pixels, then crops a random HxW window per image."""
  b, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * padding + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def random_flip(rng, images):
  """Flips each image left-right with probability 1/2."""
  flip = jax.random.bernoulli(rng, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1], images)


def random_rotate_scale(rng, images, max_degrees, max_scale):
  """Rotates each image by U(-max_degrees, max_degrees) and zooms by U(1-max_scale, 1+max_scale).

  Bilinear sampling about the image centre; pixels from outside the image are zero.
  """
  b, h, w, c = images.shape
  k_angle, k_scale = jax.random.split(rng)
  angle = jnp.deg2rad(jax.random.uniform(k_angle, (b,), minval=-max_degrees, maxval=max_degrees))
  scale = jax.random.uniform(k_scale, (b,), minval=1 - max_scale, maxval=1 + max_scale)
  yy, xx = jnp.meshgrid(jnp.arange(h) - (h - 1) / 2, jnp.arange(w) - (w - 1) / 2, indexing='ij')

  def warp(img_HWC, a, s):
    cos, sin = jnp.cos(a) / s, jnp.sin(a) / s
    src_y = cos * yy - sin * xx + (h - 1) / 2
    src_x = sin * yy + cos * xx + (w - 1) / 2
    channel = lambda ch: jax.scipy.ndimage.map_coordinates(ch, [src_y, src_x], order=1, cval=0.0)
    return jax.vmap(channel, in_axes=2, out_axes=2)(img_HWC)

  return jax.vmap(warp)(images, angle, scale)


def augment(rng, images, *, crop_padding=0, flip=False, max_rotate_degrees=0.0, max_scale=0.0):
  """Applies the enabled augmentations (a zero or False argument disables one) to float images."""
  chex.assert_rank(images, 4)
  k_crop, k_flip, k_affine = jax.random.split(rng, 3)
  if max_rotate_degrees or max_scale:
    images = random_rotate_scale(k_affine, images, max_rotate_degrees, max_scale)
  if crop_padding:
    images = random_crop(k_crop, images, crop_padding)
  if flip:
    images = random_flip(k_flip, images)
  return images
