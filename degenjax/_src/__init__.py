"""degenjax's implementation modules (private: the public names are re-exported by ``degenjax``)."""

import sys as _sys

# In a Jupyter kernel without ipywidgets, the first import of ``tqdm.auto`` (numpyro imports it, and so do the
# progress bars) warns "IProgress not found" and falls back to text progress bars, which is what degenjax uses
# anyway. Import it once here, before any of those, with that one warning silenced.
if "ipykernel" in _sys.modules and "tqdm.auto" not in _sys.modules:
    import warnings as _warnings

    with _warnings.catch_warnings():
        _warnings.filterwarnings("ignore", message="IProgress not found")
        import tqdm.auto  # noqa: F401
