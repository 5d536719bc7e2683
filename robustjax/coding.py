"""Gradient coding: encoding matrices, `encode`, and decoders (majority vote, stragglers).

Gradient coding is a linear map on the worker axis. The data are split into m subsets with
per-subset gradients g_1..g_m (a stack with leading axis m); worker i holds the subsets in the
support of row i of an **encoding matrix** B (n workers × m subsets) and sends the coded vector

    c_i = Σ_j B_ij g_j,        i.e.  c = encode(B, g) = einsum('ij,j...->i...', B, g).

Every scheme here is a plain array B, so any scheme, or a hand-made one, plugs into the same
`encode` and the same training step (`robustjax.training`, ``config.coding``; `make` turns a spec
string into a `Code`, the encoding stage):

=======================  =================================  ====================  ==================
scheme                   B (n × m)                          subsets per worker    server side
=======================  =================================  ====================  ==================
`cyclic` (LAD)           row i: 1/d on π(i), …, π(i+d−1)    d                     any robust rule
`fractional_repetition`  n/d groups of d workers, block 1/d  d (needs d | n)       any robust rule
`draco`                  groups of ≥ 2f+1 workers, blocks   group size (≈ 2f+1)    `draco_decode`
`cyclic_mds` (Tandon)    cyclic support s+1, MDS weights     s + 1                 `decoding_vector`
=======================  =================================  ====================  ==================

Conventions (checked by the tests):
  * With the default coefficients (1/d, resp. 1/group size) every column of `cyclic` and
    `fractional_repetition` sums to 1, so (1/n) Σ_i c_i = (1/m) Σ_j g_j is the full gradient.
  * Under a fresh uniformly random permutation π (`cyclic(..., key=k)`), the d subsets of a worker
    are a uniform d-subset drawn without replacement, and the finite-population formula gives

        E‖c_i − ḡ‖² = (n − d) / (d (n − 1)) · ζ²,   ζ² = (1/n) Σ_j ‖g_j − ḡ‖²,

    with ζ² the *population* spread (normalised by n, not n − 1) of the subset gradients and
    ḡ = (1/n) Σ_j g_j. With the unbiased spread S² = n ζ² / (n − 1) the same quantity reads
    (n − d)/(n d) · S². d = 1 gives ζ², d = n gives 0.

References:
  Li, Allouah, Guerraoui, Skoglund, Xiao, "Byzantine-Robust and Communication-Efficient Distributed
  Training: Compressive and Cyclic Gradient Coding", arXiv:2603.28780, 2026 (LAD, Com-LAD).
  Tandon, Lei, Dimakis, Karampatziakis, "Gradient Coding: Avoiding Stragglers in Distributed
  Learning", ICML 2017 (fractional repetition, cyclic MDS code, decoding vectors).
  Chen, Wang, Charles, Papailiopoulos, "DRACO: Byzantine-resilient Distributed Training via
  Redundant Gradients", ICML 2018 (repetition code, majority vote).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from robustjax import _sorting
from robustjax import stack as _stack
from robustjax._checks import check_positive_int, num_workers

__all__ = [
  'Code',
  'make',
  'cyclic',
  'fractional_repetition',
  'draco_groups',
  'draco',
  'draco_decode',
  'cyclic_mds',
  'decoding_vector',
  'decode',
  'encode',
  'loads',
  'coverage',
  'random_permutation',
]

_HIGHEST = jax.lax.Precision.HIGHEST


def _is_concrete_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_d(rule: str, n: int, d) -> None:
  """Checks 1 <= d <= n when d is a concrete int (a traced d is the caller's responsibility)."""
  if _is_concrete_int(d):
    if not 1 <= int(d) <= n:
      raise ValueError(f'{rule}: needs 1 <= d <= n (subsets per worker); got d={d}, n={n}')
  elif isinstance(d, (float, bool)) or d is None:
    raise ValueError(f'{rule}: d must be an int (or an integer jax array); got {d!r}')


def random_permutation(key: jax.Array, n: int) -> jax.Array:
  """A uniformly random permutation of range(n) from an explicit key (int32 (n,))."""
  return jax.random.permutation(key, n).astype(jnp.int32)


def cyclic(
  n: int,
  d,
  *,
  key: jax.Array | None = None,
  perm: jax.Array | None = None,
  coef=None,
  dtype=jnp.float32,
) -> jax.Array:
  """The cyclic (LAD) encoding matrix: worker i holds subsets π(i), π(i+1), …, π(i+d−1) mod n.

  B_ij = coef if subset j is one of worker i's d subsets, else 0; there are n subsets (m = n), each
  row has d nonzeros and each column is covered d times. With the default coef = 1/d the coded
  vector c_i is the mean of worker i's subset gradients and (1/n) Σ_i c_i is the full gradient.

  The permutation π is the identity (a fixed assignment, the classical cyclic repetition code), a
  given `perm`, or re-drawn from `key` (LAD re-draws it every iteration; pass a fresh key per
  step). Under a re-drawn π, E‖c_i − ḡ‖² = (n − d)/(d(n − 1)) · ζ² (see the module docstring).

  Jittable: `key`, `perm` and even `d` may be traced (a traced integer `d`, e.g. under `vmap` over
  a sweep of redundancies, builds the same matrix by a mask; validation then happens only for
  concrete d).

  Args:
    n: number of workers = number of subsets (static).
    d: subsets per worker (the redundancy / computation load), 1 <= d <= n.
    key: optional PRNG key; draws π uniformly at random.
    perm: optional permutation of range(n) (ignored if `key` is given).
    coef: the nonzero value; default 1/d.
    dtype: the matrix dtype.

  Returns:
    B of shape (n, n).

  Raises:
    ValueError: if n < 1, d is out of range, or `perm` has the wrong shape.

  .. warning::
     The abstract of arXiv:2603.28780 does not fix the coefficients or whether π is re-drawn;
     1/d (an average, unbiased full gradient) and a re-drawn π are this library's defaults, and
     both are parameters.

  Example:
    >>> B = cyclic(5, 2)       # worker 0 holds subsets {0, 1}, worker 4 holds {4, 0}
    >>> B = cyclic(100, 10, key=jax.random.key(0))

  Cost: O(n²) to build (a mask); encoding is one n × n × p matmul.
  """
  check_positive_int('cyclic', 'n', n)
  _check_d('cyclic', n, d)
  if key is not None:
    perm = random_permutation(key, n)
  rows = jnp.arange(n)[:, None]
  cols = jnp.arange(n)[None, :]
  if perm is None:
    pos = cols  # π = identity: subset j sits at position j
  else:
    perm = jnp.asarray(perm)
    if perm.shape != (n,):
      raise ValueError(f'cyclic: perm must have shape ({n},); got {perm.shape}')
    # position of subset j in the cyclic order: π⁻¹(j)
    pos = jnp.zeros((n,), jnp.int32).at[perm].set(jnp.arange(n, dtype=jnp.int32))[None, :]
  d_arr = jnp.asarray(d)
  mask = jnp.mod(pos - rows, n) < d_arr
  value = (1.0 / d_arr.astype(jnp.float32)) if coef is None else jnp.asarray(coef)
  return jnp.where(mask, value, 0.0).astype(dtype)


def fractional_repetition(
  n: int,
  d: int,
  *,
  key: jax.Array | None = None,
  coef=None,
  dtype=jnp.float32,
) -> jax.Array:
  """Tandon et al.'s fractional repetition code: n/d groups of d workers sharing d subsets.

  Workers g·d … g·d + d − 1 (group g) all hold subsets g·d … g·d + d − 1 and send the same coded
  vector. Each subset is covered d times, each worker holds d subsets; with s = d − 1 stragglers
  one surviving worker per group suffices to decode (`decoding_vector`). With `key`, the subsets
  are randomly relabelled (a column permutation), so the group contents are re-drawn.

  Args:
    n: workers = subsets.
    d: group size = subsets per worker; must divide n.
    key: optional PRNG key for a random relabelling of the subsets.
    coef: the nonzero value; default 1/d.
    dtype: the matrix dtype.

  Returns:
    B of shape (n, n), block diagonal (before relabelling).

  Raises:
    ValueError: if d is out of range or does not divide n.
  """
  check_positive_int('fractional_repetition', 'n', n)
  check_positive_int('fractional_repetition', 'd', d)
  if d > n:
    raise ValueError(f'fractional_repetition: needs 1 <= d <= n; got d={d}, n={n}')
  if n % d:
    raise ValueError(f'fractional_repetition: needs d to divide n; got n={n}, d={d}')
  group = np.arange(n) // d
  mask = jnp.asarray(group[:, None] == group[None, :])
  value = 1.0 / d if coef is None else coef
  b = jnp.where(mask, jnp.asarray(value, dtype), jnp.zeros((), dtype))
  if key is not None:
    b = b[:, random_permutation(key, n)]
  return b


def draco_groups(n: int, f: int, *, r: int | None = None) -> tuple[int, ...]:
  """The repetition groups of DRACO: worker i (and subset i) belongs to group `groups[i]`.

  DRACO's repetition code needs every part of the data computed by r >= 2f + 1 workers, so that a
  majority vote inside each group recovers the part's gradient exactly with up to f Byzantine
  workers anywhere. The workers are cut into g = ⌊n/r⌋ contiguous groups whose sizes differ by at
  most one (each >= r); subsets are cut the same way, so group k's n_k workers all hold the same
  n_k subsets, and each worker computes n_k ≈ n/g subsets.

  .. warning::
     DRACO (Chen et al. 2018) assumes r divides n. When it does not (n = 100 with r = 21), this
     library enlarges the groups (4 groups of 25 for f = 10), which keeps the vote exact but costs
     each worker n_k > r subsets; `loads(draco(...))` reports the real cost.

  Args:
    n: workers = subsets.
    f: the number of Byzantine workers to tolerate.
    r: the repetition; default 2f + 1 (must be >= 2f + 1 and <= n).

  Returns:
    A tuple of n group ids in 0..g−1, non-decreasing (hashable: a static argument).

  Raises:
    ValueError: if r < 2f + 1 or r > n.
  """
  check_positive_int('draco', 'n', n)
  if not _is_concrete_int(f) or f < 0:
    raise ValueError(f'draco: f must be an int >= 0; got {f!r}')
  r = 2 * f + 1 if r is None else r
  check_positive_int('draco', 'r', r)
  if r < 2 * f + 1:
    raise ValueError(f'draco: the repetition r must be >= 2f + 1 for a majority vote; got r={r}')
  if r > n:
    raise ValueError(f'draco: needs n >= r = 2f + 1 workers; got n={n}, r={r}, f={f}')
  g = n // r
  sizes = [n // g + (1 if k < n % g else 0) for k in range(g)]
  return tuple(int(k) for k, s in enumerate(sizes) for _ in range(s))


def draco(n: int, f: int, *, r: int | None = None, dtype=jnp.float32) -> jax.Array:
  """DRACO's repetition-code encoding matrix (see `draco_groups`): block diagonal, 1/n_k blocks.

  Row i has 1/n_k on the subsets of its group k (the group's mean gradient), so every honest
  member of a group sends the same vector. Decode with `draco_decode`.

  Returns:
    B of shape (n, n).
  """
  groups = np.asarray(draco_groups(n, f, r=r))
  sizes = np.bincount(groups)
  b = (groups[:, None] == groups[None, :]) / sizes[groups][:, None]
  return jnp.asarray(b, dtype)


@functools.partial(jax.jit, static_argnames=('groups', 'f'))
def draco_decode(stack, *, groups: tuple[int, ...], f: int):
  """DRACO's decoder: a majority vote inside each repetition group, then the weighted group mean.

  The vote, group by group: the honest members of group k send identical vectors and hold a strict
  majority (group size >= 2f + 1, at most f Byzantine workers), so in every coordinate the lower
  median of the group's values *is* the honest value (a block of more than half of equal values in
  a sorted list always covers the median position). The decoded vector v_k is the group member
  closest (exact squared distances, no Gram expansion) to that coordinate-wise median: a received
  message, the honest one (or a Byzantine copy of it). The output is Σ_k (n_k / n) v_k, the full
  gradient. Exact with up to f Byzantine workers placed anywhere, whatever they send.

  .. warning::
     DRACO votes on whole messages; comparing float32 messages by their pairwise distances
     (a Gram expansion) cannot tell rounding from disagreement, so the vote is done through the
     coordinate-wise median, which selects the majority's value exactly. Honest copies that differ
     in their last bits (float32 encodings of identical rows) are all within rounding of v_k.

  Non-finite inputs are mapped to +inf before the median and are at infinite distance from it, so
  they never win.

  Args:
    stack: the n received vectors (a stack).
    groups: the group id of every worker, from `draco_groups` (static).
    f: the declared number of Byzantine workers (checked against the group sizes).

  Returns:
    One tree: the decoded full gradient.

  Raises:
    ValueError: if the groups do not match the stack, or a group is smaller than 2f + 1.

  Cost: a selection network (or bisection) over each group's rows, a pass for the distances and
  one weighted sum: a few streaming passes over the stack.
  """
  n = num_workers(stack, 'draco_decode')
  if len(groups) != n:
    raise ValueError(f'draco_decode: groups has {len(groups)} entries for n={n} workers')
  g_np = np.asarray(groups)
  sizes = np.bincount(g_np)
  if not isinstance(f, int) or f < 0:
    raise ValueError(f'draco_decode: f must be an int >= 0; got {f!r}')
  if sizes.min() < 2 * f + 1:
    raise ValueError(
      f'draco_decode: every group needs >= 2f + 1 = {2 * f + 1} workers; smallest has {sizes.min()}'
    )
  member = jnp.asarray(g_np[None, :] == np.arange(sizes.size)[:, None])  # (g, n)
  # The groups by size (sizes differ by at most one in `draco_groups`; any grouping works). Each
  # size s gives an index matrix (s, g_s): row j holds the j-th member of each group of that size.
  # The gathered stack, seen as (s, g_s · p), has a column per (group, coordinate), so one
  # selection (`_sorting.order_statistics`, rank (s − 1) // 2) finds every group's lower median.
  by_size = [
    np.stack([np.flatnonzero(g_np == k) for k in np.flatnonzero(sizes == s)], axis=1)
    for s in np.unique(sizes)
  ]

  dist = 0.0
  for leaf in jax.tree.leaves(stack):
    x = _stack.as_matrix(leaf)  # (n, p)
    x = jnp.where(jnp.isfinite(x), x, jnp.inf)
    part = jnp.zeros((n,), x.dtype)
    for idx in by_size:
      size, count = idx.shape
      rows = x[idx]  # (s, g_s, p)
      (med,) = _sorting.order_statistics(rows.reshape(size, -1), [(size - 1) // 2])
      diff = rows - med.reshape(1, count, -1)
      part = part.at[idx].add(jnp.sum(diff * diff, axis=2))
    dist = dist + part
  # A coordinate-sharded stack (`stack.sharded_coordinates`) sums the distance over devices.
  dist = _stack.psum_coordinates(dist)
  dist = jnp.where(jnp.isfinite(dist), dist, jnp.inf)
  # winner per group: the member closest to the median, lowest index on ties
  best = jnp.min(jnp.where(member, dist[None, :], jnp.inf), axis=1)  # (g,)
  first = jnp.argmax(member & (dist[None, :] == best[:, None]), axis=1)  # (g,) winning worker
  winner = jnp.zeros((n,), bool).at[first].set(True)
  weights = jnp.where(winner, jnp.asarray(sizes[g_np] / n, jnp.float32), 0.0)
  return _stack.weighted_sum(weights, stack)


def cyclic_mds(n: int, s: int, *, seed: int = 0) -> np.ndarray:
  """Tandon et al.'s cyclic MDS gradient code (Algorithm 2): tolerates any s stragglers.

  Worker i holds subsets i, i+1, …, i+s (mod n) (cyclic support, s + 1 nonzeros per row). A random
  s × n matrix H with H·1 = 0 is drawn; row i is 1 on subset i and the unique combination of
  the next s subsets that makes H bᵢ = 0. The rows span null(H), an (n − s)-dimensional space
  containing 1, and any n − s of them are (with probability 1) a basis of it, so every set of n − s
  surviving workers can reconstruct Σ_j g_j (`decoding_vector`).

  Args:
    n: workers = subsets.
    s: the number of stragglers to tolerate, 0 <= s < n.
    seed: seeds H (NumPy; this is setup-time, float64).

  Returns:
    float64 NumPy array B of shape (n, n). The coefficients are not 1/(s+1): decode, do not average.

  Raises:
    ValueError: if s is out of range.

  .. warning::
     The random construction is numerically fine for small n (tens); its decoding systems grow
     ill-conditioned for large n, as Tandon et al. note.
  """
  check_positive_int('cyclic_mds', 'n', n)
  if not _is_concrete_int(s) or not 0 <= s < n:
    raise ValueError(f'cyclic_mds: needs 0 <= s < n stragglers; got s={s!r}, n={n}')
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(s, n))
  if s:
    h[:, -1] = -h[:, :-1].sum(axis=1)
  b = np.zeros((n, n))
  for i in range(n):  # setup time, NumPy
    j = (i + np.arange(s + 1)) % n
    b[i, j[0]] = 1.0
    if s:
      b[i, j[1:]] = np.linalg.solve(h[:, j[1:]], -h[:, j[0]])
  return b


def decoding_vector(b, stragglers: Sequence[int] = (), *, atol: float = 1e-6) -> np.ndarray:
  """A decoding vector a with a_i = 0 for every straggler i and aᵀB = 1ᵀ (the sum of all subsets).

  Solves the small linear system B_Fᵀ a_F = 1 over the surviving rows F in float64 (least squares,
  then checks the residual), so it works for any code, e.g. `cyclic_mds` or
  `fractional_repetition` (any surviving worker per group).

  Args:
    b: the (n, m) encoding matrix (array-like).
    stragglers: indices of the workers that did not answer.
    atol: the largest residual ‖B_Fᵀ a_F − 1‖_∞ (relative to 1) accepted as exact.

  Returns:
    float64 NumPy (n,): Σ_i a_i c_i = Σ_j g_j.

  Raises:
    ValueError: if a straggler index is out of range or repeated, or the survivors cannot
      reconstruct the sum (too many stragglers for the code).
  """
  b = np.asarray(b, np.float64)
  if b.ndim != 2:
    raise ValueError(f'decoding_vector: B must be 2-D (workers × subsets); got shape {b.shape}')
  n, m = b.shape
  strag = sorted(int(i) for i in stragglers)
  if len(set(strag)) != len(strag) or any(not 0 <= i < n for i in strag):
    raise ValueError(f'decoding_vector: stragglers must be distinct in 0..{n - 1}; got {strag}')
  alive = np.setdiff1d(np.arange(n), strag)
  if alive.size == 0:
    raise ValueError('decoding_vector: too many stragglers to decode (every worker straggles)')
  sol, *_ = np.linalg.lstsq(b[alive].T, np.ones(m), rcond=None)
  resid = np.max(np.abs(b[alive].T @ sol - 1.0))
  if not np.isfinite(resid) or resid > atol:
    raise ValueError(
      f'decoding_vector: too many stragglers to decode: the {alive.size} surviving rows do not '
      f'span the all-ones vector (residual {resid:.2e}; {len(strag)} stragglers)'
    )
  a = np.zeros(n)
  a[alive] = sol
  return a


def decode(a, coded):
  """Σ_i a_i c_i for a decoding vector `a` (n,) and the coded stack (one weighted sum).

  Straggler rows (a_i = 0) may hold anything, NaN included (`weighted_sum` ignores them).
  """
  return _stack.weighted_sum(jnp.asarray(a, jnp.float32), coded)


def encode(b, subset_grads):
  """The coded vectors c = B g: `einsum('ij,j...->i...', B, g)` for every leaf of a stack.

  Args:
    b: encoding matrix (n, m), e.g. from `cyclic`.
    subset_grads: a stack with leading axis m (one slice per data subset), any pytree.

  Returns:
    A stack with leading axis n (one coded vector per worker), each leaf in its own dtype
    (accumulation in float32 at least, HIGHEST precision).

  Raises:
    ValueError: if B is not 2-D or its number of columns is not the stack's leading axis.

  Cost: one n × m × p matmul per leaf (p the leaf size).
  """
  b = jnp.asarray(b)
  if b.ndim != 2:
    raise ValueError(f'encode: B must be 2-D (workers × subsets); got shape {b.shape}')
  m = num_workers(subset_grads, 'encode')
  if b.shape[1] != m:
    raise ValueError(
      f'encode: B has {b.shape[1]} columns (subsets) but the subset stack has leading axis {m}'
    )

  def one(x):
    x = jnp.asarray(x)
    xm = _stack.as_matrix(x)
    out = jnp.einsum('ij,jk->ik', b.astype(xm.dtype), xm, precision=_HIGHEST)
    return out.reshape((b.shape[0],) + x.shape[1:]).astype(x.dtype)

  return jax.tree.map(one, subset_grads)


def loads(b) -> jax.Array:
  """(n,) subsets each worker computes: the number of nonzeros in each row of B."""
  return jnp.sum(jnp.asarray(b) != 0, axis=1)


def coverage(b) -> jax.Array:
  """(m,) how many workers hold each subset: the number of nonzeros in each column of B."""
  return jnp.sum(jnp.asarray(b) != 0, axis=0)


# ----------------------------------------------------------------------------------------------
# Codes as a training stage.

_CODES = ('identity', 'cyclic', 'fractional_repetition', 'draco', 'cyclic_mds')


@dataclasses.dataclass(frozen=True)
class Code:
  """The encoding stage of the training step: which matrix B the workers apply, step by step.

  Hashable (a static argument of the jitted step). Build it with `make`.

  Attributes:
    name: one of ``identity``, ``cyclic``, ``fractional_repetition``, ``draco``, ``cyclic_mds``.
    params: the scheme's parameters, a sorted tuple of (name, value) pairs (``d``, ``r``, ``s``;
      ``redraw`` for cyclic: re-draw π every step, LAD's default; ``byzantine``: which rows of B
      the f Byzantine workers hold, see `matrix`).
    n: workers = subsets.
    f: Byzantine workers (DRACO sizes its groups with it).
  """

  name: str
  params: tuple
  n: int
  f: int

  @property
  def identity(self) -> bool:
    """No encoding: worker i sends its own gradient (the default)."""
    return self.name == 'identity'

  @property
  def spec(self) -> str:
    if not self.params:
      return self.name
    return f'{self.name}({", ".join(f"{k}={v!r}" for k, v in self.params)})'

  @property
  def key_ids(self) -> tuple | None:
    """Per-worker ids for shared compression randomness (DRACO's groups), or None."""
    if self.name == 'draco':
      return draco_groups(self.n, self.f, r=dict(self.params).get('r'))
    return None

  def matrix(self, key: jax.Array) -> jax.Array:
    """B (n × n) for one step; `key` re-draws LAD's permutation (ignored by fixed codes).

    The engine treats the last f rows as the Byzantine workers'. ``byzantine='last'`` (default)
    keeps B's order, so the Byzantine workers are contiguous in the cyclic order (with a cyclic
    code of d ≤ f, f − d + 1 subsets have no honest holder); ``'random'`` permutes the rows once
    (a fixed random set of workers, drawn from ``seed``); ``'redrawn'`` permutes them every step.
    """
    p = dict(self.params)
    n = self.n
    k_code, k_rows = jax.random.split(key)
    if self.name == 'cyclic':
      redraw = p.get('redraw', True)
      b = cyclic(n, p['d'], key=k_code if redraw else None, coef=p.get('coef'))
    elif self.name == 'fractional_repetition':
      b = fractional_repetition(n, p['d'])
    elif self.name == 'draco':
      b = draco(n, self.f, r=p.get('r'))
    elif self.name == 'cyclic_mds':
      b = jnp.asarray(cyclic_mds(n, p['s'], seed=p.get('seed', 0)), jnp.float32)
    else:
      b = jnp.eye(n, dtype=jnp.float32)
    placement = p.get('byzantine', 'last')
    if placement == 'random':
      b = b[jax.random.permutation(jax.random.key(p.get('seed', 0)), n)]
    elif placement == 'redrawn':
      b = b[jax.random.permutation(k_rows, n)]
    return b


def make(spec, *, n: int, f: int) -> Code:
  """A `Code` from a spec string: ``'identity'`` (default), ``'cyclic(d=20)'`` (LAD, π re-drawn
  every step; ``redraw=False`` fixes it), ``'fractional_repetition(d=4)'``, ``'draco'``
  (``r=2f + 1`` by default), ``'cyclic_mds(s=2)'``; coded schemes take
  ``byzantine='last' | 'random' | 'redrawn'`` (which workers are Byzantine, see `Code.matrix`).

  The matrix is built once here for validation, so a bad ``d`` or an impossible DRACO fails at
  build time.

  Raises:
    ValueError: for an unknown scheme (listing the known ones) or bad parameters.
  """
  from robustjax._spec import parse_spec

  if isinstance(spec, Code):
    return spec
  name, params = parse_spec(spec or 'identity')
  if name in ('none', ''):
    name = 'identity'
  if name not in _CODES:
    raise ValueError(f'unknown coding {name!r}; known codings: {", ".join(_CODES)}')
  required = {'cyclic': 'd', 'fractional_repetition': 'd', 'cyclic_mds': 's'}.get(name)
  if required and required not in params:
    raise ValueError(f'coding {name!r} needs {required}=..., e.g. {name}({required}=2)')
  placement = params.get('byzantine', 'last')
  if placement not in ('last', 'random', 'redrawn'):
    raise ValueError(f"coding {spec!r}: byzantine must be 'last', 'random' or 'redrawn'")
  if placement != 'last' and name in ('identity', 'draco'):
    raise ValueError(
      f'coding {spec!r}: byzantine={placement!r} needs a coded scheme (cyclic, '
      'fractional_repetition, cyclic_mds); DRACO is exact wherever the Byzantine workers are'
    )
  code = Code(name, tuple(sorted(params.items())), int(n), int(f))
  try:
    code.matrix(jax.random.key(0))
  except TypeError as e:
    raise ValueError(f'coding {spec!r}: {e}') from None
  return code
