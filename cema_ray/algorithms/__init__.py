"""CEMA's building blocks in plain torch: entropy, edge-side selection, replay and distillation."""
from cema_ray.algorithms.distill import selective_distillation_loss
from cema_ray.algorithms.entropy import e0, entropy, reweight
from cema_ray.algorithms.replay import ReplayBuffer
from cema_ray.algorithms.selection import EntropyFilter

__all__ = ["EntropyFilter", "ReplayBuffer", "e0", "entropy", "reweight", "selective_distillation_loss"]
