"""Models that can be installed (GET /admin/catalog): sources, estimates, the in-memory cache.

Not to be confused with :mod:`proxy.catalog`, which is what the nodes serve now.
"""

from .catalog import Installable, Source
from .entry import Entry, fits, gpu_bytes, matches

__all__ = ["Entry", "Installable", "Source", "fits", "gpu_bytes", "matches"]
