"""Methods: importing this package registers every method in `METHODS`."""
from cema_ray.methods.base import METHODS, CloudTrainer, EdgePolicy, EdgeResult, MethodSpec

# Each import registers its methods (the registry pattern of timm and the TTA benchmark).
from cema_ray.methods import source, bn, tent, eata, cotta, sar, cema, cema_fleet  # noqa: E402,F401

__all__ = ["METHODS", "CloudTrainer", "EdgePolicy", "EdgeResult", "MethodSpec"]
