"""Hand-written kernels for the simulated accumulator.

`lowacc.kernels.pallas_fma.fma_dot` is a Pallas kernel for order='fma' (the paper's FMAq): the
same chain as the XLA path of `lowacc.dot`, bit for bit, with each output tile kept in registers
while the kernel walks the contraction. It runs in Pallas interpret mode on the CPU and through
the Triton backend on a GPU. It is not wired into `lowacc.dot_general`; call it directly on
canonical, already input-quantized operands.
"""
