// The dtype table: the one definition of the dtype codes stored in a
// stream's header. Stable: never renumber a code.
//
// TORCH_SHMEM_DTYPES(X) expands X(Enum, code, itemsize, "name", NUMPY, TORCH)
// once per dtype, where "name" is the dtype's name in NumPy and torch,
// NUMPY completes NPY_<NUMPY> (NOTYPE: NumPy has no such type) and TORCH
// completes at::k<TORCH>. The core uses the first four columns; the NumPy
// binding (csrc/python) and the torch ops (csrc/ops) the last two, and the
// NumPy binding exports code and name to Python as _core.DTYPES.
#pragma once

#include <stdint.h>

#define TORCH_SHMEM_DTYPES(X)                               \
  X(kBool, 1, 1, "bool", BOOL, Bool)                        \
  X(kInt8, 2, 1, "int8", INT8, Char)                        \
  X(kUInt8, 3, 1, "uint8", UINT8, Byte)                     \
  X(kInt16, 4, 2, "int16", INT16, Short)                    \
  X(kUInt16, 5, 2, "uint16", UINT16, UInt16)                \
  X(kInt32, 6, 4, "int32", INT32, Int)                      \
  X(kUInt32, 7, 4, "uint32", UINT32, UInt32)                \
  X(kInt64, 8, 8, "int64", INT64, Long)                     \
  X(kUInt64, 9, 8, "uint64", UINT64, UInt64)                \
  X(kFloat16, 10, 2, "float16", FLOAT16, Half)              \
  X(kFloat32, 11, 4, "float32", FLOAT32, Float)             \
  X(kFloat64, 12, 8, "float64", FLOAT64, Double)            \
  X(kComplex64, 13, 8, "complex64", COMPLEX64, ComplexFloat) \
  X(kComplex128, 14, 16, "complex128", COMPLEX128, ComplexDouble) \
  X(kBFloat16, 15, 2, "bfloat16", NOTYPE, BFloat16) /* GPU streams only */

namespace torch_shmem {
namespace core {

enum DType : uint32_t {
#define TORCH_SHMEM_X(e, code, size, name, np, th) e = code,
  TORCH_SHMEM_DTYPES(TORCH_SHMEM_X)
#undef TORCH_SHMEM_X
  kDTypeEnd = 16,
};

// Bytes per element for a dtype code, 0 if the code is unknown.
constexpr uint32_t dtype_itemsize(uint32_t code) {
  switch (code) {
#define TORCH_SHMEM_X(e, c, size, name, np, th) \
  case c:                                       \
    return size;
    TORCH_SHMEM_DTYPES(TORCH_SHMEM_X)
#undef TORCH_SHMEM_X
    default:
      return 0;
  }
}

}  // namespace core
}  // namespace torch_shmem
