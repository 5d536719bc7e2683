"""The shipped `robustjax.configs.sweep_bucketing`, kept here for old command lines."""

from robustjax.configs.sweep_bucketing import *  # noqa: F403
from robustjax.configs.sweep_bucketing import get_config  # noqa: F401
