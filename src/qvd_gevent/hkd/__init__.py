"""The house-keeping daemon: host lifecycle, VMs, heartbeat, lost nodes (docs/hkd.md).

``HKD(cfg, db, listener).start()`` returns once the host is running (or raises HkdError);
``.stop(timeout=None)`` stops the VMs and marks the host stopped.
"""
from .errors import HkdConfigError, HkdError
from .host import HKD

__all__ = ["HKD", "HkdConfigError", "HkdError"]
