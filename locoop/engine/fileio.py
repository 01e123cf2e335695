"""Atomic writes for every file the framework produces (see docs/ARCHITECTURE.md, "One mechanism, one place").

Checkpoints, few-shot splits, feature-cache entries, the config dump, result files, SeTAR logs and
settings all go through these helpers: a killed run leaves the old file or none, never a truncated
one, and files get the user's umask. The implementation lives in :mod:`clip.fileio` (the CLIP
package's downloads and checkpoint writers use it too, and ``clip`` does not depend on the
framework); this module is the framework's name for it.
"""
from clip.fileio import (TMP_SUFFIX, atomic_copy, atomic_folder, atomic_torch_save, atomic_write, atomic_write_bytes,
                         atomic_write_text, current_umask, is_temp_name, make_temp_folder, publish_folder,
                         remove_stale_temps, temp_name, temp_owner)

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_torch_save", "atomic_copy",
           "atomic_folder", "make_temp_folder", "publish_folder", "temp_name", "is_temp_name", "temp_owner",
           "remove_stale_temps", "current_umask", "TMP_SUFFIX"]
