"""Build snp_fast and its compiled extension `snp_fast._C`.

What is built is decided from the environment, never from whether a GPU is present, so a GPU-less
build machine still compiles the CUDA sources:
  SNP_FAST_BUILD_CUDA = auto (default: when torch has CUDA and nvcc is found) | 1 (required) | 0 (skip)
  TORCH_CUDA_ARCH_LIST  the CUDA architectures (default here: 9.0, H200)
  SNP_FAST_DEBUG=1      keep debug info (default builds use -g0, which is much faster)
The same source lists drive CMakeLists.txt (csrc/sources.cmake is not needed: both glob csrc/).
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
    mode = os.environ.get('SNP_FAST_BUILD_CUDA', 'auto').lower()
    have = torch.version.cuda is not None and CUDA_HOME is not None \
        and os.path.exists(os.path.join(CUDA_HOME, 'bin', 'nvcc'))
    if mode in ('0', 'false', 'no'):
        return False
    if mode in ('1', 'true', 'yes') and not have:
        raise RuntimeError('SNP_FAST_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found (set CUDA_HOME)')
    return have


def _extensions():
    if os.environ.get('SNP_FAST_NO_EXTENSION') == '1':
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    debug = os.environ.get('SNP_FAST_DEBUG') == '1'
    cxx = ['-O3', '-std=c++20', '-fopenmp'] + ([] if debug else ['-g0'])
    sources = _sources('csrc/*.cpp') + _sources('csrc/cpu/*.cpp')
    link = ['-fopenmp', '-ldl']  # dl: csrc/cpu/blas.h looks torch's BLAS syrk up with dlsym
    if _want_cuda():
        os.environ.setdefault('TORCH_CUDA_ARCH_LIST', '9.0')
        ext = CUDAExtension(
            'snp_fast._C', sources + _sources('csrc/cuda/*.cu'),
            define_macros=[('SNP_FAST_WITH_CUDA', '1')],
            extra_compile_args={'cxx': cxx, 'nvcc': ['-O3', '-std=c++20', '--use_fast_math'] + ([] if debug else ['-Xcompiler', '-g0'])},
            extra_link_args=link,
        )
    else:
        ext = CppExtension('snp_fast._C', sources, extra_compile_args={'cxx': cxx}, extra_link_args=link)
    return [ext], {'build_ext': BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
