"""Hand-written kernels for the simulated accumulator.

`lowacc.kernels.pallas_fma.fma_dot` is a Pallas kernel for order='fma' (the paper's FMAq): the
same chain as the XLA path of `lowacc.dot`, bit for bit, with each output tile kept in registers
while the kernel walks the contraction. It runs in Pallas interpret mode on the CPU and through
the Triton backend on a GPU. It is not wired into `lowacc.dot_general`; call it directly on
canonical, already input-quantized operands.

`lowacc.kernels.native` runs order='fma' (the paper's FMAq) and order='chunk', with or without
product rounding, through a C++ XLA FFI kernel on the CPU (chunk_dot.cc, built by `pip install`,
AVX-512): each output tile keeps its chain in registers and its total in L1 instead of streaming
the whole M x N state once per step. It is wired into `lowacc.dot_general`'s forward for the
configs it covers (`native.supports`); the XLA path is the reference.
"""
