"""The shipped `robustjax.configs.sweep_byzfl`, kept here for old command lines."""

from robustjax.configs.sweep_byzfl import *  # noqa: F403
from robustjax.configs.sweep_byzfl import get_config  # noqa: F401
