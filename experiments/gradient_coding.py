"""Thin entry point: `python experiments/gradient_coding.py ARGS` is `robustjax coding ARGS`."""

import sys

from robustjax.cli import main

if __name__ == '__main__':
  sys.exit(main([sys.argv[0], 'coding', *sys.argv[1:]]))
