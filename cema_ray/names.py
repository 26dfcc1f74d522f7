"""The names a config may use for stream protocols and corruptions, defined once.

A module of its own, without torch or numpy, so that the config schema (which lists them as allowed
values) stays cheap to import while the streams and the corruption code use the very same tuples.
"""
from __future__ import annotations

PROTOCOLS: tuple[str, ...] = ("continual", "reset", "mixed", "gradual", "label_shift")
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
)
