// The CPU-mirror copy of GPU streams through the dispatcher (the op
// shmem::mirror_copy), shared by the CUDA half and simulated device memory.
#pragma once

#include <stdint.h>

namespace torch_shmem {
namespace ops {

// The CPU-mirror copy through the op shmem::mirror_copy, whose CUDA kernel
// (the Triton kernel, torch_shmem/kernels/mirror.py) is registered from
// Python when torch_shmem.ops is imported: copies `nbytes` from device
// memory `src` on `device` into page-locked host memory `dst`, queued on
// the device's current CUDA stream. Returns false, having done nothing,
// when no CUDA kernel is registered for the op (C++-only use); the caller
// then copies with the copy engine.
bool mirror_copy_via_op(void* src, void* dst, uint64_t nbytes, int device);

}  // namespace ops
}  // namespace torch_shmem
