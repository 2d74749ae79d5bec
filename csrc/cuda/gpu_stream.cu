// The CUDA half: device memory for GPU streams (csrc/core/slots.h).
//
// One cudaMalloc allocation per stream holds the device counters and the
// payload slots; it is exported with cudaIpcGetMemHandle (the handle lives
// in the stream's CPU header) and mapped with cudaIpcOpenMemHandle at most
// once per process (legacy IPC forbids opening one's own handle, so the
// creating process serves its own pointer from the same cache).
//
// Writer operations run on the current torch CUDA stream of the stream's
// device and are ordered by it: gen odd (1-thread kernel) -> copy -> gen
// even -> count; an event recorded after them is waited on before the host
// publication, so only the writer's own work is waited for, never the
// whole device. Readers copy on their current stream and read the slot's
// generation after the copy (same stream), then synchronize that stream.
//
// Only c10/cuda headers are used (the toolkit on the build machines has no
// cuBLAS headers, so ATen/cuda/CUDAContext.h is not available).
#include <cuda_runtime.h>
#include <cudaTypedefs.h>  // driver types and PFN_* only; libcuda is never linked

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <errno.h>
#include <unistd.h>

#include "../core/slots.h"
#include "../ops/registry.h"

namespace torch_shmem {
namespace cuda {

namespace {

using core::Header;
using IID = std::array<uint8_t, 16>;

// On failure the runtime's last-error state is cleared before throwing:
// torch checks cudaGetLastError() after its own launches, and would report
// our error from an unrelated kernel later.
#define TSHM_CUDA_CHECK(call, what)                                                        \
  do {                                                                                     \
    cudaError_t err_ = (call);                                                             \
    if (err_ != cudaSuccess) (void)cudaGetLastError();                                     \
    TORCH_CHECK(err_ == cudaSuccess, "torch_shmem: ", what, ": ", #call, " failed: ",       \
                cudaGetErrorString(err_));                                                 \
  } while (0)

__global__ void store_u64_kernel(unsigned long long* p, unsigned long long v) {
  // One thread; stream order makes the store visible to later work on the
  // writer's stream, the system fence to other streams and processes.
  *reinterpret_cast<volatile unsigned long long*>(p) = v;
  __threadfence_system();
}

// Fallback device-side wait where stream memory operations are unavailable:
// one thread polls the count (volatile, so every iteration reloads it);
// the stream's later work starts when the kernel ends.
__global__ void wait_geq_kernel(const unsigned long long* p, unsigned long long v) {
  const volatile unsigned long long* q = p;
  while (*q < v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    __nanosleep(256);
#endif
  }
  __threadfence_system();
}

// cuStreamWaitValue64, fetched from the driver at run time (never linked,
// so the library loads on machines without a driver); nullptr if the
// driver does not provide it.
PFN_cuStreamWaitValue64_v11070 stream_wait_value64() {
  static PFN_cuStreamWaitValue64_v11070 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuStreamWaitValue64", &p, 11070, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      p = nullptr;
    }
    return reinterpret_cast<PFN_cuStreamWaitValue64_v11070>(p);
  }();
  return fn;
}

// Device scope for destructors and deleters: plain runtime calls whose
// errors are ignored (c10's CUDAGuard throws on error, and a destructor may
// run while the runtime is being torn down at process exit).
class QuietDeviceScope {
 public:
  explicit QuietDeviceScope(int device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    if (prev_ != device) (void)cudaSetDevice(device);
    (void)cudaGetLastError();
  }
  ~QuietDeviceScope() {
    if (prev_ >= 0) (void)cudaSetDevice(prev_);
    (void)cudaGetLastError();
  }
  QuietDeviceScope(const QuietDeviceScope&) = delete;
  QuietDeviceScope& operator=(const QuietDeviceScope&) = delete;

 private:
  int prev_ = -1;
};

// The CPU-mirror copy: the Triton kernel through shmem::mirror_copy
// (default; stores from the SMs straight into the page-locked pages) or the
// copy engine (TORCH_SHMEM_MIRROR=copy; one DMA). Read when a stream is
// mapped. Pages that could not be page-locked always take the copy engine.
bool mirror_by_copy_engine_requested() {
  const char* v = std::getenv("TORCH_SHMEM_MIRROR");
  return v != nullptr && std::string(v) == "copy";
}

// Host uploads from pageable memory: "direct" hands the pageable pointer to
// cudaMemcpyAsync (the driver stages it); "staged" copies it through two
// page-locked chunks of this process, the memcpy of one chunk overlapping
// the DMA of the other. TORCH_SHMEM_HOST_UPLOAD=direct|staged, read when a
// stream is mapped; sources that are already page-locked always go by DMA.
bool staged_uploads_requested() {
  const char* v = std::getenv("TORCH_SHMEM_HOST_UPLOAD");
  return v != nullptr && std::string(v) == "staged";
}
constexpr size_t kStageChunk = size_t(4) << 20;

bool is_page_locked(const void* p) {
  cudaPointerAttributes a;
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return a.type == cudaMemoryTypeHost;
}

IID iid_of(const Header* h) {
  IID id;
  std::memcpy(id.data(), h->instance_id, 16);
  return id;
}

// One mapping of one allocation in this process.
struct Mapping {
  void* base = nullptr;
  size_t bytes = 0;
  int device = -1;
  bool owned = false;  // allocated by this process (cudaFree) vs imported (close handle)
  // Highest count each CUDA stream of this process was told to wait for
  // (wait_device) on this allocation: a publish queued behind such a wait
  // on the same stream could never run.
  std::mutex waits_mu;
  std::map<cudaStream_t, uint64_t> waits;
  // The stream's header page (importer table); nullptr where it could not
  // be mapped writable. An importer's entry is cleared after its unmap.
  std::unique_ptr<core::HeaderPin> pin;
  bool registered = false;
  ~Mapping() {
    if (base != nullptr) {
      QuietDeviceScope scope(device);
      if (owned)
        (void)cudaFree(base);
      else
        (void)cudaIpcCloseMemHandle(base);
      (void)cudaGetLastError();
    }
    if (registered) pin->remove_importer(static_cast<int32_t>(getpid()));
  }
};

// Never destroyed (see g_entries in csrc/ops/shmem_ops.cpp): the driver
// releases every allocation and mapping when the process exits.
std::mutex& g_mu = *new std::mutex();
// every live mapping
std::map<IID, std::weak_ptr<Mapping>>& g_cache = *new std::map<IID, std::weak_ptr<Mapping>>();
// the creator keeps its allocation until unlink
std::map<IID, std::shared_ptr<Mapping>>& g_owned = *new std::map<IID, std::shared_ptr<Mapping>>();
// unlinked by the creator, kept while another live process maps them
std::vector<std::shared_ptr<Mapping>>& g_pending = *new std::vector<std::shared_ptr<Mapping>>();

// Drops the pending allocations no live importer maps any more (freed once
// no handle of this process uses them). Called on every create, attach and
// unlink of a GPU stream in this process.
void sweep_pending() {
  std::vector<std::shared_ptr<Mapping>> drop;
  {
    std::lock_guard<std::mutex> g(g_mu);
    for (auto it = g_pending.begin(); it != g_pending.end();) {
      if ((*it)->pin == nullptr || (*it)->pin->live_importers() == 0) {
        drop.push_back(std::move(*it));
        it = g_pending.erase(it);
      } else {
        ++it;
      }
    }
  }
  // `drop` frees here, outside the lock.
}

class CudaSlotMemory : public core::SlotMemory {
 public:
  CudaSlotMemory(std::shared_ptr<Mapping> map, const Header* h)
      : map_(std::move(map)),
        stride_(h->slot_stride),
        nbytes_(h->payload_bytes),
        staged_(staged_uploads_requested()),
        mirror_by_kernel_(!mirror_by_copy_engine_requested()) {
    c10::cuda::CUDAGuard guard(device());
    TSHM_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming), "event");
  }
  ~CudaSlotMemory() override {
    QuietDeviceScope scope(map_->device);
    (void)cudaEventDestroy(done_);
    for (int i = 0; i < 2; ++i) {
      if (stage_done_[i] != nullptr) (void)cudaEventDestroy(stage_done_[i]);
      if (stage_[i] != nullptr) (void)cudaFreeHost(stage_[i]);
    }
    (void)cudaGetLastError();
  }

  void store_gen(uint32_t slot, uint64_t gen) override {
    if (gen & 1) refuse_self_deadlock((gen + 1) / 2);
    store_u64(core::gen_offset(slot), gen);
  }

  void copy_in(uint32_t slot, const void* src, bool src_on_device) override {
    c10::cuda::CUDAGuard guard(device());
    if (!src_on_device && staged_ && nbytes_ > kStageChunk && !is_page_locked(src)) {
      staged_upload(slot_ptr(slot), static_cast<const uint8_t*>(src));
      return;
    }
    TSHM_CUDA_CHECK(cudaMemcpyAsync(slot_ptr(slot), src, nbytes_,
                                    src_on_device ? cudaMemcpyDeviceToDevice
                                                  : cudaMemcpyHostToDevice,
                                    stream()),
                    "copy into a GPU stream slot");
  }

  void store_count(uint64_t count) override { store_u64(0, count); }

  void finish_writer() override {
    c10::cuda::CUDAGuard guard(device());
    TSHM_CUDA_CHECK(cudaEventRecord(done_, stream()), "record the write event");
    TSHM_CUDA_CHECK(cudaEventSynchronize(done_), "wait for the write");
  }

  uint64_t copy_out_then_gen(uint32_t slot, void* dst, bool dst_on_device) override {
    c10::cuda::CUDAGuard guard(device());
    cudaStream_t st = stream();
    TSHM_CUDA_CHECK(cudaMemcpyAsync(dst, slot_ptr(slot), nbytes_,
                                    dst_on_device ? cudaMemcpyDeviceToDevice
                                                  : cudaMemcpyDeviceToHost,
                                    st),
                    "copy out of a GPU stream slot");
    unsigned long long gen = 0;
    TSHM_CUDA_CHECK(cudaMemcpyAsync(&gen, static_cast<uint8_t*>(map_->base) + core::gen_offset(slot),
                                    sizeof(gen), cudaMemcpyDeviceToHost, st),
                    "read the slot generation");
    TSHM_CUDA_CHECK(cudaStreamSynchronize(st), "wait for the read");
    return gen;
  }

  // Into the CPU payload, page-locked by the writer's handle (Entry::host_pin):
  // the Triton kernel (through the dispatcher) or one DMA; pageable pages
  // (registration failed) go through the driver's copy.
  void mirror_out(uint32_t slot, void* host_dst) override {
    c10::cuda::CUDAGuard guard(device());
    cudaStream_t st = stream();
    const bool by_kernel = mirror_by_kernel_ && is_page_locked(host_dst) &&
                           ops::mirror_copy_via_op(slot_ptr(slot), host_dst, nbytes_, map_->device);
    if (!by_kernel)
      TSHM_CUDA_CHECK(cudaMemcpyAsync(host_dst, slot_ptr(slot), nbytes_, cudaMemcpyDeviceToHost, st),
                      "copy a GPU stream slot into its CPU mirror");
    TSHM_CUDA_CHECK(cudaStreamSynchronize(st), "wait for the CPU mirror copy");
  }

  void* slot_ptr(uint32_t slot) override {
    return static_cast<uint8_t*>(map_->base) + core::kDeviceCountersBytes + stride_ * slot;
  }

  // The consumer's current CUDA stream waits for count >= n on the device;
  // the host returns at once. A driver without 64-bit stream memory
  // operations (CUDA_ERROR_NOT_SUPPORTED) gets the polling kernel instead,
  // and keeps it for the rest of the process.
  bool queue_wait_count(uint64_t n, double /*host_timeout*/) override {
    c10::cuda::CUDAGuard guard(device());
    cudaStream_t st = stream();
    auto* count = static_cast<unsigned long long*>(map_->base);  // offset 0
    {
      std::lock_guard<std::mutex> g(map_->waits_mu);
      uint64_t& w = map_->waits[st];
      w = std::max(w, n);
    }
    static std::atomic<bool> mem_ops_ok{true};
    if (auto fn = stream_wait_value64(); fn != nullptr && mem_ops_ok.load()) {
      CUresult r = fn(reinterpret_cast<CUstream>(st), reinterpret_cast<CUdeviceptr>(count),
                      static_cast<cuuint64_t>(n), CU_STREAM_WAIT_VALUE_GEQ);
      if (r == CUDA_SUCCESS) return true;
      TORCH_CHECK(r == CUDA_ERROR_NOT_SUPPORTED || r == CUDA_ERROR_INVALID_VALUE,
                  "torch_shmem: cuStreamWaitValue64 on a GPU stream failed (CUresult ", int(r), ")");
      mem_ops_ok.store(false);
    }
    wait_geq_kernel<<<1, 1, 0, st>>>(count, static_cast<unsigned long long>(n));
    TSHM_CUDA_CHECK(cudaGetLastError(), "queue a device-side wait");
    return true;
  }

 private:
  c10::DeviceIndex device() const { return static_cast<c10::DeviceIndex>(map_->device); }
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream(device()).stream(); }
  void store_u64(uint64_t offset, uint64_t v) {
    c10::cuda::CUDAGuard guard(device());
    auto* p = reinterpret_cast<unsigned long long*>(static_cast<uint8_t*>(map_->base) + offset);
    store_u64_kernel<<<1, 1, 0, stream()>>>(p, static_cast<unsigned long long>(v));
    TSHM_CUDA_CHECK(cudaGetLastError(), "store a device counter");
  }

  // The writer's first queued operation for publication c: refuse (before
  // anything is queued) when this process parked the same CUDA stream on a
  // count >= c of this allocation, which only this publication could reach.
  void refuse_self_deadlock(uint64_t c) {
    cudaStream_t st = stream();
    std::lock_guard<std::mutex> g(map_->waits_mu);
    auto it = map_->waits.find(st);
    if (it == map_->waits.end()) return;
    TORCH_CHECK(it->second < c, "torch_shmem: cannot publish count ", c,
                " on this CUDA stream: it was told to wait (wait_device) for count ",
                it->second, " of the same GPU stream, so the write would queue behind its own "
                "wait and never run; publish from another CUDA stream");
    map_->waits.erase(it);  // count c - 1 >= the wait's count is already published
  }

  // Pageable source -> slot through two page-locked chunks: chunk i is
  // copied into stage_[i % 2] once the DMA that last read that buffer is
  // done (its event), then queued for DMA on the writer's stream; the host
  // memcpy of one chunk overlaps the DMA of the previous one.
  void staged_upload(void* dst, const uint8_t* src) {
    cudaStream_t st = stream();
    for (int i = 0; i < 2; ++i) {
      if (stage_[i] == nullptr) {
        TSHM_CUDA_CHECK(cudaHostAlloc(&stage_[i], kStageChunk, cudaHostAllocPortable),
                        "allocate an upload staging buffer");
        TSHM_CUDA_CHECK(cudaEventCreateWithFlags(&stage_done_[i], cudaEventDisableTiming),
                        "event");
      }
    }
    uint64_t off = 0;
    for (int i = 0; off < nbytes_; ++i, off += kStageChunk) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(kStageChunk, nbytes_ - off));
      const int b = i & 1;
      // (at once for the first two chunks: the last write ended with its
      // queue complete, and an event never recorded counts as complete)
      TSHM_CUDA_CHECK(cudaEventSynchronize(stage_done_[b]), "wait for a staging buffer");
      std::memcpy(stage_[b], src + off, n);
      TSHM_CUDA_CHECK(cudaMemcpyAsync(static_cast<uint8_t*>(dst) + off, stage_[b], n,
                                      cudaMemcpyHostToDevice, st),
                      "upload into a GPU stream slot");
      TSHM_CUDA_CHECK(cudaEventRecord(stage_done_[b], st), "record a staging event");
    }
  }

  std::shared_ptr<Mapping> map_;
  uint64_t stride_;
  uint64_t nbytes_;
  bool staged_;
  bool mirror_by_kernel_;
  cudaEvent_t done_ = nullptr;
  void* stage_[2] = {nullptr, nullptr};
  cudaEvent_t stage_done_[2] = {nullptr, nullptr};
};

int device_by_uuid(const uint8_t uuid[16]) {
  int n = 0;
  TSHM_CUDA_CHECK(cudaGetDeviceCount(&n), "count devices");
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp prop;
    TSHM_CUDA_CHECK(cudaGetDeviceProperties(&prop, i), "device properties");
    if (std::memcmp(prop.uuid.bytes, uuid, 16) == 0) return i;
  }
  return -1;
}

class CudaBackend : public ops::GpuBackend {
 public:
  std::shared_ptr<core::SlotMemory> create(Header* h, int device) override {
    sweep_pending();
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    auto map = std::make_shared<Mapping>();
    map->device = device;
    map->bytes = h->device_bytes;
    map->owned = true;
    map->pin = core::HeaderPin::open(std::string(h->name, h->name_len), h->instance_id);
    TSHM_CUDA_CHECK(cudaMalloc(&map->base, map->bytes), "allocate a GPU stream");
    // Zeroed on a private non-blocking stream and waited for alone: neither
    // the legacy default stream (which would wait for every blocking stream)
    // nor the caller's current stream (which may be parked in wait_device).
    {
      cudaStream_t zs = nullptr;
      TSHM_CUDA_CHECK(cudaStreamCreateWithFlags(&zs, cudaStreamNonBlocking), "zero a GPU stream");
      cudaError_t e1 = cudaMemsetAsync(map->base, 0, map->bytes, zs);
      cudaError_t e2 = e1 == cudaSuccess ? cudaStreamSynchronize(zs) : e1;
      (void)cudaStreamDestroy(zs);
      TSHM_CUDA_CHECK(e2, "zero a GPU stream");
    }
    cudaIpcMemHandle_t handle;
    TSHM_CUDA_CHECK(cudaIpcGetMemHandle(&handle, map->base), "export a GPU stream");
    static_assert(sizeof(handle) <= sizeof(h->ipc_handle), "IPC handle does not fit");
    std::memcpy(h->ipc_handle, &handle, sizeof(handle));
    cudaDeviceProp prop;
    TSHM_CUDA_CHECK(cudaGetDeviceProperties(&prop, device), "device properties");
    std::memcpy(h->device_uuid, prop.uuid.bytes, 16);
    h->device_index = static_cast<uint32_t>(device);
    {
      std::lock_guard<std::mutex> g(g_mu);
      g_cache[iid_of(h)] = map;
      g_owned[iid_of(h)] = map;
    }
    return std::make_shared<CudaSlotMemory>(map, h);
  }

  std::shared_ptr<core::SlotMemory> attach(const Header* h, int device, int* device_out) override {
    int found = device_by_uuid(h->device_uuid);
    TORCH_CHECK(found >= 0, "torch_shmem: GPU stream '", std::string(h->name, h->name_len),
                "' lives on a device this process cannot see (check CUDA_VISIBLE_DEVICES)");
    TORCH_CHECK(device < 0 || device == found, "torch_shmem: GPU stream '",
                std::string(h->name, h->name_len), "' lives on cuda:", found,
                " in this process, not cuda:", device);
    *device_out = found;
    sweep_pending();
    const IID id = iid_of(h);
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_cache.find(id);
    std::shared_ptr<Mapping> map = it == g_cache.end() ? nullptr : it->second.lock();
    if (map == nullptr) {
      c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(found));
      cudaIpcMemHandle_t handle;
      std::memcpy(&handle, h->ipc_handle, sizeof(handle));
      map = std::make_shared<Mapping>();
      map->device = found;
      map->bytes = h->device_bytes;
      // Registered before mapping, so the creator cannot free the memory
      // between our open and our entry; then the unlinked flag is checked,
      // so an entry made after the creator's last look backs out (the
      // creator unlinks first, then counts importers).
      const std::string name(h->name, h->name_len);
      int why = 0;
      map->pin = core::HeaderPin::open(name, h->instance_id, &why);
      TORCH_CHECK(map->pin != nullptr || why == EACCES || why == EPERM,
                  "torch_shmem: GPU stream '", name,
                  "' was unlinked; its device memory is being released");
      if (map->pin != nullptr) {
        TORCH_CHECK(map->pin->add_importer(static_cast<int32_t>(getpid())),
                    "torch_shmem: GPU stream '", name, "' is already mapped by ",
                    core::kMaxImporters, " other processes (the limit)");
        map->registered = true;
        TORCH_CHECK(!map->pin->unlinked(), "torch_shmem: GPU stream '", name,
                    "' was unlinked; its device memory is being released");
      }
      cudaError_t err = cudaIpcOpenMemHandle(&map->base, handle, cudaIpcMemLazyEnablePeerAccess);
      if (err != cudaSuccess) {
        (void)cudaGetLastError();  // not torch's error to find later
        map->base = nullptr;
        TORCH_CHECK(false, "torch_shmem: cannot map GPU stream '",
                    std::string(h->name, h->name_len), "' (",
                    cudaGetErrorString(err),
                    "); its creating process may have exited, which frees the device memory");
      }
      g_cache[id] = map;
    }
    return std::make_shared<CudaSlotMemory>(map, h);
  }

  void forget(const uint8_t instance_id[16]) override {
    IID id;
    std::memcpy(id.data(), instance_id, 16);
    {
      std::lock_guard<std::mutex> g(g_mu);
      auto it = g_owned.find(id);
      if (it != g_owned.end()) {
        g_pending.push_back(std::move(it->second));
        g_owned.erase(it);
      }
    }
    // Freed now if no other live process maps it and no handle of this
    // process uses it; else later (a sweep, or the last handle's close).
    sweep_pending();
  }

  std::shared_ptr<void> pin_host(void* p, uint64_t bytes) override {
    if (p == nullptr || bytes == 0) return nullptr;
    // Portable: usable from every device's context; mapped: the mirror kernel
    // stores into the pages through their device address.
    if (cudaHostRegister(p, static_cast<size_t>(bytes),
                         cudaHostRegisterPortable | cudaHostRegisterMapped) != cudaSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    return std::shared_ptr<void>(p, [](void* q) {
      (void)cudaHostUnregister(q);
      (void)cudaGetLastError();
    });
  }
};

CudaBackend g_backend;

struct Register {
  Register() { ops::set_gpu_backend(&g_backend); }
} g_register;

}  // namespace
}  // namespace cuda
}  // namespace torch_shmem
