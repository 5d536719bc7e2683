"""DRACO's majority vote as a registered rule (the server side of `robustjax.coding.draco`)."""

from __future__ import annotations

from robustjax import coding
from robustjax._checks import num_workers
from robustjax.aggregators._base import Properties, register

__all__ = ['draco']


@register('draco', properties=Properties(decodes=True))
def draco(stack, *, f: int, r: int | None = None):
  """DRACO's decoder on a stack encoded with `robustjax.coding.draco(n, f, r=r)`.

  The repetition groups follow from (n, f, r) (`coding.draco_groups`), so the rule needs nothing
  but the stack: a majority vote inside each group, then the weighted group mean
  (`coding.draco_decode`). Exact with up to f Byzantine messages anywhere; meaningless on a stack
  that was not DRACO-encoded.

  Args:
    stack: the n received messages.
    f: the number of Byzantine workers tolerated (groups have ≥ 2f + 1 members).
    r: the repetition (default 2f + 1), as given to `coding.draco`.

  References:
    Chen, Wang, Charles, Papailiopoulos, "DRACO: Byzantine-resilient Distributed Training via
    Redundant Gradients", ICML 2018.
  """
  n = num_workers(stack, 'draco')
  return coding.draco_decode(stack, groups=coding.draco_groups(n, f, r=r), f=f)
