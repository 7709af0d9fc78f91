"""Compiles the Cython sources in ext/ into native modules of the accman
package: ext/wire.pyx -> accman.server._wire, ext/ledger.pyx -> accman.ledger._ledger,
ext/check.pyx -> accman.ledger._check, ext/pipeline.pyx -> accman.server._pipeline.
The C declarations that one module shares with another are .pxd files
beside the module (accman/server/_wire.pxd, accman/ledger/_ledger.pxd),
found through the package directory on the include path.

ACCMAN_ONLY=wire (or ledger) builds one module alone, so that a developer
working on one does not need the other to compile; ACCMAN_DEBUG=1 builds
with Cython's checks on (`just build-debug`)."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

MODULES = {
    "wire": Extension("accman.server._wire", ["ext/wire.pyx"]),
    "ledger": Extension("accman.ledger._ledger", ["ext/ledger.pyx"]),
    "check": Extension("accman.ledger._check", ["ext/check.pyx"]),
    "pipeline": Extension("accman.server._pipeline", ["ext/pipeline.pyx"]),
}

only = os.environ.get("ACCMAN_ONLY")
extensions = [MODULES[only]] if only else list(MODULES.values())
# ACCMAN_DEBUG=1: a debug build, which CI runs the native modules' tests
# against once: Cython's bounds, wraparound and initialisation checks on,
# C asserts kept, no optimisation.
debug = os.environ.get("ACCMAN_DEBUG") == "1"
for ext in extensions:
    ext.extra_compile_args = ["-O0", "-g", "-UNDEBUG"] if debug else ["-O2"]
# The modules are translated and compiled side by side, one per core: the
# compiler is most of a fresh install's time.
JOBS = os.cpu_count() or 1

setup(
    options={"build_ext": {"parallel": JOBS}},
    ext_modules=cythonize(
        extensions,
        nthreads=JOBS,
        include_path=["ext", "."],
        force=debug,
        compiler_directives={
            "language_level": "3",
            "boundscheck": debug,
            "wraparound": debug,
            "initializedcheck": debug,
            "cdivision": not debug,
        },
    ),
)
