"""``python -m robustjax``: the `robustjax` command (see `robustjax.cli`)."""

import sys

from robustjax.cli import main

sys.exit(main())
