// One stream opened through torch.ops.shmem: what the process-local
// registry of the ops (csrc/ops/shmem_ops.cpp) maps a stream token to.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "../core/slots.h"
#include "../core/stream.h"

namespace torch_shmem {
namespace ops {

struct Entry {
  std::unique_ptr<core::Stream> stream;
  // Page-locking of stream's CPU payload (mirrored GPU streams, writable
  // handles); declared after `stream` so it is undone before the unmap.
  std::shared_ptr<void> host_pin;
  std::shared_ptr<core::SlotMemory> dev;  // GPU streams: the device slots
  int device = -1;                        // CUDA ordinal in this process, -1: CPU
  std::string name;
  int64_t iid_lo = 0;
  int64_t iid_hi = 0;
  std::atomic<bool> closing{false};
};

}  // namespace ops
}  // namespace torch_shmem
