"""`accman.client` is accman.calling.client (the same module object, so
that settings patched on one are seen by the other)."""

import sys

from accman.calling import client as _client

sys.modules[__name__] = _client
