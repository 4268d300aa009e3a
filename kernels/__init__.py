"""fastdiff's Triton kernels, one file per op family (installed as ``fastdiff.kernels``).

Each file holds private ``@triton.jit`` kernels and a host function per op that validates nothing, allocates
the outputs, picks block sizes and launches. Validation and dispatch live in ``fastdiff.ops``. Importing a
module here imports Triton; ``fastdiff.dispatch`` only does so once it chose the Triton path.
"""

import os as _os


def _interpreter_numpy2_compat() -> None:
    """Triton's interpreter before 3.7 (3.6 is the GPU machine's) turns a loop bound into an int with
    ``int(array)``, which NumPy ≥ 2.3 refuses for the 1-element arrays it holds ("only 0-dimensional arrays can be
    converted to Python scalars"): every kernel loop with a runtime bound fails there. Newer Triton squeezes the
    array first; do the same, once, for the interpreter only (compiled kernels never take this path)."""
    try:
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 - no Triton, or a build without the interpreter: nothing to patch
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_fastdiff_compat", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._fastdiff_compat = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if _os.environ.get("TRITON_INTERPRET", "0") == "1":
    _interpreter_numpy2_compat()
