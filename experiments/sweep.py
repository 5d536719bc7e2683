"""Thin entry point: `python experiments/sweep.py ARGS` is `robustjax sweep ARGS`."""

import sys

from robustjax.cli import main

if __name__ == '__main__':
  sys.exit(main([sys.argv[0], 'sweep', *sys.argv[1:]]))
