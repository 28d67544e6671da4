"""CPU kernels for packed layers, compiled on first use from C sources shipped with the package.

`KERNELS` are the modes `stompp_hf.set_kernel` accepts: "auto" (a kernel wherever it applies and builds, the
reference path elsewhere), "xnor" (the XNOR-popcount kernel, raising where it cannot run) and "reference" (unpack
the signs and use torch's dense ops). All modes give bit-identical outputs.

Modules: `xnor` (the XNOR-popcount kernel, C source in `xnor.c`), `build` (compiling, caching and loading the C
sources) and `cpu` (the host CPU's model and feature flags, for the build cache key and `describe_cpu`).
"""

KERNELS: tuple[str, ...] = ("auto", "xnor", "reference")

__all__ = ["KERNELS"]
