"""The shipped `robustjax.configs.cifar10_resnet20`, kept here for old command lines."""

from robustjax.configs.cifar10_resnet20 import *  # noqa: F403
from robustjax.configs.cifar10_resnet20 import get_config  # noqa: F401
