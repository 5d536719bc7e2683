"""The aggregator registry: `get(name)` and `names()`."""

from robustjax._registry import Registry

REGISTRY = Registry('aggregator')
register = REGISTRY.register
