"""The shipped `robustjax.configs.default`, kept here for old command lines."""

from robustjax.configs.default import *  # noqa: F403
from robustjax.configs.default import get_config  # noqa: F401
