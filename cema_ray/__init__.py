"""cema_ray: CEMA cloud-edge elastic model adaptation on Ray."""
__version__ = "0.1.0"
