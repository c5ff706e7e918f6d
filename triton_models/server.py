"""The launcher's public names where callers imported them before it became `triton_models.launcher`;
`python -m triton_models.server` still runs `mgm-serve`."""

import sys

from triton_models.launcher.cli import main
from triton_models.launcher.errors import ServerError
from triton_models.launcher.install import bundled_libs_dir, cache_root, pytriton_libs_dir
from triton_models.launcher.process import TritonServer, free_port, port_is_free

__all__ = [
    "ServerError",
    "TritonServer",
    "bundled_libs_dir",
    "cache_root",
    "free_port",
    "main",
    "port_is_free",
    "pytriton_libs_dir",
]

if __name__ == "__main__":
    sys.exit(main())
