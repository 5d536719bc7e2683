"""Spec strings: rules, attacks and models named on a command line.

``'nnm+krum'`` is pre-aggregators then the aggregator, joined by ``+`` (the same spelling as
`robustjax.preaggregators.Pipeline.name`); keyword parameters go in parentheses with Python
literal values: ``'bucketing(s=2)+multikrum(m=3)'``, ``'ipm(eps=0.5)'``, ``'mlp(hidden=(64,))'``.
"""

from __future__ import annotations

import ast
import re

__all__ = ['parse_spec', 'parse_rule', 'slug']

_SPEC = re.compile(r'^\s*([A-Za-z_][\w\-]*)\s*(?:\((.*)\))?\s*$', re.S)


def parse_spec(text: str) -> tuple[str, dict]:
  """``'name(k=v, ...)'`` -> ``('name', {k: v})`` (values as Python literals).

  Raises:
    ValueError: for a malformed spec.
  """
  m = _SPEC.match(text or '')
  if not m:
    raise ValueError(f'cannot parse {text!r}; expected name or name(key=value, ...)')
  name, args = m.group(1), m.group(2)
  params = {}
  if args and args.strip():
    try:
      call = ast.parse(f'f({args})', mode='eval').body
      if call.args:
        raise ValueError('positional arguments')
      params = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as e:
      raise ValueError(f'cannot parse the parameters of {text!r}: {e}') from None
  return name, params


def _split_plus(text: str) -> list[str]:
  parts, depth, cur = [], 0, ''
  for ch in text:
    depth += ch in '([{'
    depth -= ch in ')]}'
    if ch == '+' and depth == 0:
      parts.append(cur)
      cur = ''
    else:
      cur += ch
  parts.append(cur)
  return parts


def parse_rule(text: str) -> tuple[tuple, str, dict]:
  """``'pre1(..)+pre2+agg(..)'`` -> ``(pre entries, aggregator name, aggregator params)``."""
  items = [parse_spec(p) for p in _split_plus(text)]
  pre = tuple(name if not params else (name, params) for name, params in items[:-1])
  return pre, items[-1][0], items[-1][1]


def slug(text: str) -> str:
  """A shell-safe file name for a spec: ``'ipm(eps=0.5)'`` -> ``'ipm_eps-0.5'``,
  ``'bucketing(s=2)+krum'`` -> ``'bucketing_s-2+krum'`` (letters, digits, ``. _ + -`` only).

  Example:
    >>> slug("gaussian(std=3.0, mean=(1, 2))")
    'gaussian_std-3.0_mean-1_2'
  """
  out = re.sub(r'\s+', '', text).replace('=', '-')
  out = re.sub(r'[^A-Za-z0-9._+\-]+', '_', out)
  out = re.sub(r'_+(?=[+\-]|$)|(?<=[+\-])_+', '', out)
  return re.sub(r'_+', '_', out).strip('_') or '_'
