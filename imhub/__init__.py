"""imhub: multi-tenant instant messaging.

The runtime lives in :mod:`imhub.runtime`, the Kubernetes operator in
:mod:`imhub.operator`, and the command line in :mod:`imhub.cli`.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
