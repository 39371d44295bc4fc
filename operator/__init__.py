"""The imhub Kubernetes operator (import name ``imhub.operator``).

Reconciles ``ImTenant`` resources (group ``imhub.io``) into a PostgreSQL
schema and role, Kafka topics, an S3 bucket, a coturn secret, a credentials
Secret and the tenant's workloads. :mod:`imhub.operator.main` starts it;
``imhub operator`` on the command line calls that.

This folder sits at the top of the repository as ``operator/``. Python puts
the current directory on ``sys.path`` for ``python -c``, ``python -`` and
``python -m``, so from the repository root ``import operator`` would find this
package instead of the standard library module and break everything that
imports ``collections``. The block below makes that import yield the standard
library module: this package is only ever ``imhub.operator``. It uses nothing
but modules loaded at interpreter start, because it can run while
``collections`` is half imported.
"""

if __name__ == "operator":  # pragma: no cover - exercised by a subprocess test
    import _frozen_importlib_external as _external
    import os as _os
    import sys as _sys

    _loader = _external.SourceFileLoader(
        "operator", _os.path.join(_os.path.dirname(_os.__file__), "operator.py")
    )
    _stdlib_operator = type(_sys)("operator")
    _stdlib_operator.__file__ = _loader.path
    _stdlib_operator.__loader__ = _loader
    # The import system returns whatever sits in sys.modules once this file has
    # run, so the standard module replaces this one for the importer.
    _sys.modules["operator"] = _stdlib_operator
    _loader.exec_module(_stdlib_operator)
