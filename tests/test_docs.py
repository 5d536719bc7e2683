"""Every ```python block of README.md and docs/*.md runs as written (a broken snippet fails CI).

Each block runs in a fresh namespace, from the repository root (some read committed files such
as docs/robustness_results.json), in this process (JAX is already imported and warm).
"""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BLOCK = re.compile(r'^```python\n(.*?)^```', re.S | re.M)


def _blocks():
  out = []
  for path in ['README.md', *sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))]:
    path = os.path.relpath(os.path.join(ROOT, path), ROOT)
    with open(os.path.join(ROOT, path)) as fh:
      text = fh.read()
    for m in _BLOCK.finditer(text):
      line = text[: m.start()].count('\n') + 1
      out.append(pytest.param(path, line, m.group(1), id=f'{path}:{line}'))
  return out


BLOCKS = _blocks()


def test_the_docs_have_python_blocks():
  assert len(BLOCKS) >= 7


@pytest.mark.parametrize('path, line, code', BLOCKS)
def test_python_block_runs_as_written(path, line, code, monkeypatch):
  monkeypatch.chdir(ROOT)
  exec(compile(code, f'{path}:{line}', 'exec'), {'__name__': '__docs__'})  # noqa: S102
