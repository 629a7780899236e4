"""Builds lowacc's native CPU kernel; the package's metadata and dependencies are in setup.cfg.

lowacc/kernels/chunk_dot.cc is an XLA FFI handler: it needs the FFI headers that jaxlib ships
(hence jaxlib in pyproject.toml's build requirements). The extension is optional: where it does
not compile, lowacc runs its XLA path instead (lowacc.kernels.native.available() says which).
"""

import os

from setuptools import Extension, setup


def _ffi_include_dir() -> str:
  import jaxlib  # the headers sit in the package: what jax.ffi.include_dir() returns
  return os.path.join(os.path.dirname(jaxlib.__file__), 'include')


setup(ext_modules=[Extension(
    'lowacc.kernels._chunk_dot', ['lowacc/kernels/chunk_dot.cc'],
    include_dirs=[_ffi_include_dir()], language='c++', optional=True,
    extra_compile_args=['-O3', '-std=c++17', '-ffp-contract=off', '-Wno-attributes',
                        '-Wno-return-type'])])
