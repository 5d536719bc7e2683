"""Data-level attacks: label flipping (the Byzantine workers compute on altered labels)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from robustjax.attacks._base import (
  register,
)


def _check_classes(rule, num_classes):
  if (
    not isinstance(num_classes, (int, np.integer))
    or isinstance(num_classes, bool)
    or num_classes < 2
  ):
    raise ValueError(f'{rule}: num_classes must be an int >= 2; got {num_classes!r}')


@register('label_flip', kind='data')
def flip_labels(labels, num_classes: int):
  """Label flipping: y ↦ (C − 1) − y. Byzantine workers compute honest gradients on these labels.

  References:
    Allen-Zhu et al., ICLR 2021; Allouah et al., AISTATS 2023 (the "LF" attack).
  """
  _check_classes('flip_labels', num_classes)
  labels = jnp.asarray(labels)
  return (num_classes - 1 - labels).astype(labels.dtype)


def label_permutation(num_classes: int, *, key) -> jax.Array:
  """A random permutation π of the C labels, reproducible from `key` (a bijection, not
  necessarily without fixed points)."""
  _check_classes('label_permutation', num_classes)
  if key is None:
    raise ValueError('label_permutation: needs a key')
  return jax.random.permutation(key, num_classes).astype(jnp.int32)


def permute_labels(labels, num_classes: int, *, key):
  """Label flipping by a random permutation: y ↦ π(y), π = `label_permutation(C, key=key)`."""
  perm = label_permutation(num_classes, key=key)
  labels = jnp.asarray(labels)
  return perm[labels].astype(labels.dtype)
