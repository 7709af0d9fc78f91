"""`accman.asgi` is accman.calling.asgi (the same module object, so that
settings patched on one are seen by the other)."""

import sys

from accman.calling import asgi as _asgi

sys.modules[__name__] = _asgi
