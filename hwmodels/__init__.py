"""Hardware and model catalogs, memory planner and step-time models."""
from .estimate import estimate

__all__ = ["estimate"]
