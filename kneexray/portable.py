"""The same bytes from the data stages on any x86-64 CPU.

NumPy picks SIMD code paths at run time (AVX2, AVX-512), and its exp, log, sums and einsum give
other last bits on each: the phantom archive came out 3,011,422, 3,011,439 or 3,011,632 bytes
depending on the CPU, and every stage after it changed too. Importing this module before NumPy
(the fetch, extract and split scripts do it first) keeps NumPy on its x86-64-v2 baseline, which
every x86-64 CPU of the last fifteen years runs identically. It costs those stages about half
their time again in NumPy-heavy work (phantom: 6.0 s to 9.4 s); training is not affected.
"""

import os
import platform
import sys
import warnings

# NumPy 2.x's dispatch targets above the x86-64-v2 baseline (`numpy.show_runtime()` lists them)
ABOVE_BASELINE = ("X86_V3", "X86_V4", "AVX512_ICL", "AVX512_SPR")
VARIABLE = "NPY_DISABLE_CPU_FEATURES"


def pin_numpy_to_baseline() -> None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return
    if "numpy" in sys.modules:  # too late for this process: say so rather than pretend
        warnings.warn("kneexray.portable imported after numpy: results may depend on the CPU", stacklevel=2)
        return
    chosen = set(os.environ.get(VARIABLE, "").split()) | set(ABOVE_BASELINE)
    os.environ[VARIABLE] = " ".join(sorted(chosen))


pin_numpy_to_baseline()
