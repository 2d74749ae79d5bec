// Owners of the OS resources the core opens: a file descriptor, a mapping,
// and a freshly created shm name that must go again if creation fails.
// Each releases its resource when it goes out of scope unless release()
// (or keep()) hands it on. Internal to csrc/core.
#pragma once

#include <stddef.h>
#include <sys/mman.h>
#include <unistd.h>

#include <string>

namespace torch_shmem {
namespace core {

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { reset(); }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  bool ok() const { return fd_ >= 0; }
  // The caller owns the descriptor from now on.
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
};

class Mapping {
 public:
  Mapping() = default;
  // mmap(nullptr, bytes, prot, flags, fd, 0); check ok() (errno is set).
  Mapping(size_t bytes, int prot, int flags, int fd)
      : p_(mmap(nullptr, bytes, prot, flags, fd, 0)), bytes_(bytes) {}
  ~Mapping() { reset(); }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  Mapping& operator=(Mapping&& o) noexcept {
    if (this != &o) {
      reset();
      p_ = o.p_;
      bytes_ = o.bytes_;
      o.p_ = MAP_FAILED;
    }
    return *this;
  }
  bool ok() const { return p_ != MAP_FAILED; }
  void* get() const { return p_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }
  // The caller owns the mapping from now on.
  void* release() {
    void* p = p_;
    p_ = MAP_FAILED;
    return p;
  }
  void reset() {
    if (p_ != MAP_FAILED) munmap(p_, bytes_);
    p_ = MAP_FAILED;
  }

 private:
  void* p_ = MAP_FAILED;
  size_t bytes_ = 0;
};

// A name this process just created: removed again unless keep() is called.
class CreatedName {
 public:
  explicit CreatedName(std::string os) : os_(std::move(os)) {}
  ~CreatedName() {
    if (!kept_) shm_unlink(os_.c_str());
  }
  CreatedName(const CreatedName&) = delete;
  CreatedName& operator=(const CreatedName&) = delete;
  void keep() { kept_ = true; }

 private:
  std::string os_;
  bool kept_ = false;
};

}  // namespace core
}  // namespace torch_shmem
