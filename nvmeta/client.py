"""Former home of the NeuroVault clients, now the package :mod:`nvmeta.neurovault`.

Kept so that existing imports (``from nvmeta.client import make_client, NotFound``) keep working;
new code imports from :mod:`nvmeta.neurovault`.
"""

from nvmeta.neurovault import *  # noqa: F403
from nvmeta.neurovault import __all__  # noqa: F401
