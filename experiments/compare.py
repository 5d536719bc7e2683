"""Thin entry point: `python experiments/compare.py ARGS` is `robustjax compare ARGS`."""

import sys

from robustjax.cli import main

if __name__ == '__main__':
  sys.exit(main([sys.argv[0], 'compare', *sys.argv[1:]]))
