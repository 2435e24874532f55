"""CRC32C for the journal, without the ``crc32c`` package's import cost.

``import crc32c`` runs the package's ``__init__``, which imports ``importlib.metadata``
and looks its own version up in the installed distributions: ~0.07 s of CPU, on cdpd's
start path (issue 27, restart time), for a version string the journal never reads. So
the journal loads the package's compiled module (``crc32c._crc32c``) directly, and
registers it under its own name, so that a later ``import crc32c`` (the ext4 parser, the
iSCSI target) uses the same module. Anything unexpected (another layout of the package)
falls back to the plain import: same function, only slower to import.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

_NAME = "crc32c._crc32c"


def _load() -> Callable[..., int]:
    mod = sys.modules.get(_NAME)
    if mod is None:
        try:
            import importlib.machinery
            import importlib.util
            import os

            pkg = importlib.util.find_spec("crc32c")
            paths = list(pkg.submodule_search_locations or []) if pkg is not None else []
            mod = _from_paths(paths, importlib.machinery, importlib.util, os)
        except Exception:
            mod = None
    if mod is None:
        from crc32c import crc32c as f

        return f
    return mod.crc32c  # type: ignore[no-any-return]


def _from_paths(paths: list[str], machinery: Any, util: Any, os: Any) -> Any:
    for d in paths:
        for suffix in machinery.EXTENSION_SUFFIXES:
            path = os.path.join(d, "_crc32c" + suffix)
            if os.path.isfile(path):
                loader = machinery.ExtensionFileLoader(_NAME, path)
                spec = util.spec_from_file_location(_NAME, path, loader=loader)
                if spec is None:
                    return None
                mod = util.module_from_spec(spec)
                loader.exec_module(mod)
                sys.modules[_NAME] = mod
                return mod
    return None


#: ``crc32c(data, value=0) -> int``, the ``crc32c`` package's function
crc32c = _load()
