"""qworker: run seeded batch work through a durable queue.

The most used names are importable from here; importing this package does not
import pyarrow, torch or the backends.
"""

from .errors import QworkerError
from .task import Task

__all__ = ["QworkerError", "Task", "__version__"]

__version__ = "0.1.0"
