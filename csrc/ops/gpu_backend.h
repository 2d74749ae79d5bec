// The hook through which the CUDA half (csrc/cuda, built only with a CUDA
// toolkit) provides device memory for GPU streams to the torch ops.
#pragma once

#include <stdint.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../core/slots.h"
#include "../core/stream.h"

namespace torch_shmem {
namespace ops {

// Device memory provider for GPU streams (implemented in csrc/cuda).
class GpuBackend {
 public:
  virtual ~GpuBackend() = default;
  // Allocates the slots of a new stream on `device`, zero-filled, and
  // records the IPC handle, device index and uuid in the header.
  virtual std::shared_ptr<core::SlotMemory> create(core::Header* h, int device) = 0;
  // Maps an existing stream's slots in this process (cached per
  // allocation). device < 0: the device whose uuid the header records.
  // Sets *device_out to the ordinal used.
  virtual std::shared_ptr<core::SlotMemory> attach(const core::Header* h, int device,
                                                   int* device_out) = 0;
  // Called by unlink, after the name is gone: the creating process frees
  // its allocation once no handle of this process uses it and no other
  // live process maps it (the header's importer table).
  virtual void forget(const uint8_t instance_id[16]) = 0;
  // Page-locks and maps [p, p + bytes) (cudaHostRegister) until the result
  // is released, for the mirror kernel's stores and DMA; nullptr where that
  // fails (the mirror copy then goes through the driver's pageable path,
  // correct but slower).
  virtual std::shared_ptr<void> pin_host(void* p, uint64_t bytes, int device) = 0;
  // Drops `keep` (a live view's hold on a mapping) once the work queued so
  // far on `device`'s current CUDA stream is complete; never throws (it
  // runs in tensor deleters).
  virtual void release_after_queued_work(std::shared_ptr<core::SlotMemory> keep,
                                         int device) noexcept = 0;
  // Counters and chosen paths of this process, for tests and the GPU check
  // (e.g. device_wait_path, staged_uploads).
  virtual std::vector<std::pair<std::string, std::string>> stats() = 0;
};

GpuBackend* gpu_backend();  // nullptr when built without CUDA
void set_gpu_backend(GpuBackend* backend);

}  // namespace ops
}  // namespace torch_shmem
