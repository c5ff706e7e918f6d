"""Running tritonserver: finding it (`install`), its command line (`argv`), supervising the process
(`process`) and the `mgm-serve` CLI (`cli`)."""

from triton_models.launcher.errors import ServerError
from triton_models.launcher.install import ServerInstall, bundled_libs_dir, cache_root, find_server
from triton_models.launcher.process import TritonServer, free_port, port_is_free

__all__ = [
    "ServerError",
    "ServerInstall",
    "TritonServer",
    "bundled_libs_dir",
    "cache_root",
    "find_server",
    "free_port",
    "port_is_free",
]
