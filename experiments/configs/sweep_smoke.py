"""The shipped `robustjax.configs.sweep_smoke`, kept here for old command lines."""

from robustjax.configs.sweep_smoke import *  # noqa: F403
from robustjax.configs.sweep_smoke import get_config  # noqa: F401
