"""CPU kernels for packed layers, compiled on first use from C sources shipped with the package.

`KERNELS` are the modes `stompp_hf.set_kernel` accepts: "auto" (a kernel wherever it applies, builds and pays, the
reference path elsewhere), "xnor" (the XNOR-popcount kernels, raising where they cannot run), "int8" (the exact int8
path where it applies: AMX tiles for linear layers and groups-1 convolutions, else `torch._int_mm` for linear layers;
as "auto" elsewhere) and "reference" (unpack the signs and use torch's dense ops). All modes give bit-identical
outputs, for float32 activations and, on the avx512 and AMX paths, bfloat16 ones.

Modules: `xnor` (the XNOR-popcount linear kernel and the shared library: C sources `xnor.c`, `xnor_avx512.c`,
`xnor_amx.c`, `xnor_conv.c`; code paths chosen at run time from the CPU's features), `bconv` (the binary
convolution), `int8` (+-1 as int8 on AMX tiles or through `torch._int_mm`, and when "auto" measures it),
`elementwise` (the fused passes of a training step's binarizers, C source `xnor_train.c`), `build`
(compiling, caching and loading the C sources) and `cpu` (the host CPU's model and feature flags, for the build cache
key and `describe_cpu`).
"""

KERNELS: tuple[str, ...] = ("auto", "xnor", "int8", "reference")

__all__ = ["KERNELS"]
