"""TensorRT plugins for ops TensorRT cannot express itself; opt-in and import-guarded.

    from engines.plugins import register_plugins, plugins_available
    if plugins_available():
        register_plugins()   # before building or deserializing an engine that uses them

Only the attention kernels from kernels/ are wrapped (attention.py). Importing this package never
imports TensorRT; register_plugins() raises PluginsUnavailable (an ImportError) with the fix when
TensorRT's Python plugin API (`tensorrt.plugin`, full TensorRT >= 10.7) is missing.
"""

from .attention import PluginsUnavailable, plugins_available
from .attention import register as register_plugins

__all__ = ["PluginsUnavailable", "plugins_available", "register_plugins"]
