"""Thin entry point: `python experiments/train.py ARGS` is `robustjax train ARGS`."""

import sys

from robustjax.cli import main

if __name__ == '__main__':
  sys.exit(main([sys.argv[0], 'train', *sys.argv[1:]]))
