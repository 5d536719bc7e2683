"""Thin entry point: `python experiments/robustness.py ARGS` is `robustjax kappa ARGS`."""

import sys

from robustjax.cli import main

if __name__ == '__main__':
  sys.exit(main([sys.argv[0], 'kappa', *sys.argv[1:]]))
