"""The shipped `robustjax.configs.lad`, kept here for old command lines."""

from robustjax.configs.lad import *  # noqa: F403
from robustjax.configs.lad import get_config  # noqa: F401
