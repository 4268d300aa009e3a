"""A bounds checker for Triton's interpreter: every load and store a kernel makes (where its mask is true) must land
inside the storage of one of the tensors passed to that launch.

On a GPU an address outside every allocation is an illegal memory access, which is sticky: every later CUDA call in
the process fails, so one bad launch turns into hundreds of failing tests. The interpreter reads and writes raw host
memory instead, where such an access silently reads a neighbour's bytes. Installed by tests/conftest.py whenever the
interpreter is on, so every kernel test also checks that its launches stay inside their tensors.
"""

from __future__ import annotations

import numpy as np

_ranges: list[list[tuple[int, int, str]]] = []  # one list of [start, end) storage ranges per running launch


class OutOfBounds(AssertionError):
    pass


def _check(ptrs, mask, what: str) -> None:
    if not _ranges:
        return
    addr = np.asarray(ptrs.data, dtype=np.uint64)
    if mask is not None:
        addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)]
    if addr.size == 0:
        return
    itemsize = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    ok = np.zeros(addr.shape, dtype=bool)
    for start, end, _ in _ranges[-1]:
        ok |= (addr >= start) & (addr + itemsize <= end)
    if not ok.all():
        bad = int(addr[~ok][0])
        known = ", ".join(f"{name} [{start:#x}, {end:#x})" for start, end, name in _ranges[-1])
        raise OutOfBounds(f"{what} of {int((~ok).sum())} element(s) outside every tensor of the launch: first at "
                          f"{bad:#x}; tensors: {known}")


def install() -> None:
    """Patch the interpreter once (idempotent)."""
    from triton.runtime import interpreter as interp

    if getattr(interp.GridExecutor, "_fastdiff_bounds", False):
        return
    builder = interp.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store

    def masked_load(self, ptrs, mask, other, *args, **kwargs):
        _check(ptrs, mask, "load")
        return load(self, ptrs, mask, other, *args, **kwargs)

    def masked_store(self, ptrs, value, mask, *args, **kwargs):
        _check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, *args, **kwargs)

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store

    init_args = interp.GridExecutor._init_args_hst
    call = interp.GridExecutor.__call__

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        ranges = []
        names = list(self.arg_names)

        def collect(arg, name):
            if isinstance(arg, tuple):
                for item in arg:
                    collect(item, name)
            elif hasattr(arg, "untyped_storage"):
                storage = arg.untyped_storage()
                ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes(), name))

        for i, arg in enumerate(args_hst):
            collect(arg, names[i] if i < len(names) else f"arg{i}")
        for key, arg in kwargs_hst.items():
            collect(arg, key)
        _ranges[-1] = ranges
        return args_hst, kwargs_hst

    def guarded_call(self, *args, **kwargs):
        _ranges.append([])
        try:
            return call(self, *args, **kwargs)
        finally:
            _ranges.pop()

    interp.GridExecutor._init_args_hst = init_args_hst
    interp.GridExecutor.__call__ = guarded_call
    interp.GridExecutor._fastdiff_bounds = True
