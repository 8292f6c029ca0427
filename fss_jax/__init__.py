"""fss-jax: few-shot semantic segmentation in JAX / Flax."""

import os as _os

# gs:// paths (`fss_jax.io.user_path`) are served by etils' fsspec backend (gcsfs), not by
# TensorFlow's GCS filesystem that etils picks when TensorFlow is installed: one GCS client for
# every file we read or write, and one that honours the standard STORAGE_EMULATOR_HOST (TF's
# client has its endpoint built in). Set EPATH_USE_TF=true before importing to choose TF's.
_os.environ.setdefault("EPATH_USE_TF", "false")
