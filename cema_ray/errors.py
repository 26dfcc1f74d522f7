"""Exceptions with messages a user can act on: each names the key, path or value at fault."""


class CemaError(Exception):
    """Base class of every error cema_ray raises on purpose."""


class ConfigError(CemaError, ValueError):
    """A configuration key holds an unknown name, a wrong type or an impossible value."""


class DataError(CemaError):
    """A data source is missing, malformed or of an unexpected layout."""


class CheckpointError(CemaError):
    """A checkpoint file is missing, truncated, tampered with or does not match its card."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, carrying what was recorded until then, so the outputs can still be written."""

    def __init__(self, recorder: object, facts: dict) -> None:
        super().__init__("interrupted")
        self.recorder, self.facts = recorder, facts
        self.out: object = None  # where the partial outputs went (set by run_experiment)
        self.batches = 0


class BatchRejected(CemaError):
    """A batch reaching an edge is malformed; the edge counts it and keeps running."""
