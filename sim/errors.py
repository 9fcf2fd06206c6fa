"""Errors a user can act on. The CLI prints their message and exits 2, never a traceback."""


class ServesimError(Exception):
    """Base class: the message alone must tell the user what is wrong and where."""


class ConfigError(ServesimError):
    pass


class TraceError(ServesimError):
    pass


class CapacityError(ServesimError):
    """A model does not fit its GPUs, or similar impossibility found while planning."""
