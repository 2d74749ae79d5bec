// Readiness descriptors (see notify.h for the mechanism and its ordering).
#include "notify.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#include "os_handles.h"
#include "stream_internal.h"

namespace torch_shmem {
namespace core {

namespace {

bool make_address(const std::string& path, sockaddr_un* addr, socklen_t* len) {
  if (path.size() + 1 > sizeof(addr->sun_path)) return false;
  std::memset(addr, 0, sizeof(*addr));
  addr->sun_family = AF_UNIX;
  std::memcpy(addr->sun_path, path.c_str(), path.size() + 1);
  *len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
  return true;
}

// Sockets connected to the readers this process signals often: a send()
// on a connected datagram socket skips the path lookup that every sendto()
// to a path makes (about half the cost of a signal). A reader gets one on
// its second signal within the last kSenderCacheSize first signals (so a
// writer cycling through more readers than the cache holds keeps using
// sendto instead of connecting and evicting at every signal). At most
// kSenderCacheSize, oldest evicted first; an entry goes when a send finds
// its reader gone, when this process's own Notifier of it closes, and in a
// forked child (which starts empty: the parent's lock may have been held).
constexpr size_t kSenderCacheSize = 64;

struct Sender {
  int32_t pid;
  uint64_t token;
  int fd;
};

struct SenderCache {
  std::mutex mu;
  std::vector<Sender> entries;  // oldest first
  // (pid, token) of recent signals that found no entry, a ring
  std::pair<int32_t, uint64_t> seen[kSenderCacheSize] = {};
  size_t seen_next = 0;

  SenderCache() {
    pthread_atfork([] { cache().mu.lock(); }, [] { cache().mu.unlock(); },
                   [] {
                     SenderCache& c = cache();
                     for (const Sender& e : c.entries) ::close(e.fd);
                     c.entries.clear();
                     for (auto& k : c.seen) k = {0, 0};
                     c.mu.unlock();
                   });
  }
  static SenderCache& cache() {
    static SenderCache* c = new SenderCache();  // never destroyed: usable at exit
    return *c;
  }
  void erase_at(size_t i) {
    ::close(entries[i].fd);
    entries.erase(entries.begin() + static_cast<std::ptrdiff_t>(i));
  }
};

// A socket connected to (pid, token)'s; -1: none (its socket is gone, or
// it was not signalled recently: use sendto). Caller holds the cache lock.
int connected_sender(SenderCache& c, int32_t pid, uint64_t token) {
  for (const Sender& e : c.entries)
    if (e.pid == pid && e.token == token) return e.fd;
  bool recent = false;
  for (auto& k : c.seen)
    if (k.first == pid && k.second == token) {
      recent = true;
      k = {0, 0};
      break;
    }
  if (!recent) {
    c.seen[c.seen_next] = {pid, token};
    c.seen_next = (c.seen_next + 1) % kSenderCacheSize;
    return -1;
  }
  sockaddr_un addr;
  socklen_t len;
  if (!make_address(notify_socket_path(pid, token), &addr, &len)) return -1;
  Fd fd(socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.ok() || connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), len) != 0) return -1;
  if (c.entries.size() >= kSenderCacheSize) c.erase_at(0);
  c.entries.push_back({pid, token, fd.get()});
  return fd.release();
}

// One datagram to (pid, token)'s socket. Failures are ignored: EAGAIN
// means its queue is full (it is readable already), ENOENT/ECONNREFUSED a
// reader that went away (its entry is reclaimed by the next claim).
void send_signal(int32_t pid, uint64_t token) {
  const char byte = 1;
  SenderCache& c = SenderCache::cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const int fd = connected_sender(c, pid, token);
  if (fd < 0) {  // not a frequent peer (or gone): one datagram to its path
    static const int unbound = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    sockaddr_un addr;
    socklen_t len;
    if (unbound >= 0 && make_address(notify_socket_path(pid, token), &addr, &len))
      (void)sendto(unbound, &byte, 1, MSG_DONTWAIT | MSG_NOSIGNAL,
                   reinterpret_cast<sockaddr*>(&addr), len);
    return;
  }
  if (send(fd, &byte, 1, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0 || errno == EAGAIN) return;
  for (size_t i = 0; i < c.entries.size(); ++i)  // the reader went away: forget it
    if (c.entries[i].fd == fd) {
      c.erase_at(i);
      break;
    }
}

// Drops the cached sender of (pid, token), if any.
void forget_sender(int32_t pid, uint64_t token) {
  SenderCache& c = SenderCache::cache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (size_t i = 0; i < c.entries.size(); ++i)
    if (c.entries[i].pid == pid && c.entries[i].token == token) {
      c.erase_at(i);
      return;
    }
}

// An entry whose owner can no longer drain it: its process is gone, or its
// socket file is (a recycled pid keeps the first test passing).
bool entry_dead(int32_t pid, uint64_t token) {
  if (kill(pid, 0) != 0 && errno == ESRCH) return true;
  struct stat st;
  return ::stat(notify_socket_path(pid, token).c_str(), &st) != 0 && errno == ENOENT;
}

// Clears the armed flag of entry e (accounting for it in armed_readers);
// true when it was armed.
bool disarm(Header* h, NotifyEntry& e) {
  if (e.armed.exchange(0, std::memory_order_acq_rel) != 1) return false;
  h->armed_readers.fetch_sub(1, std::memory_order_seq_cst);
  return true;
}

}  // namespace

std::string notify_socket_path(int32_t pid, uint64_t token) {
  char buf[96];
  snprintf(buf, sizeof(buf), "%s%d.%016llx", kNotifySocketPrefix, static_cast<int>(pid),
           static_cast<unsigned long long>(token));
  return buf;
}

std::unique_ptr<Notifier> Notifier::attach(const Stream& s) {
  return claim(const_cast<Header*>(s.header()), s.geometry()->mode, s.name());
}

std::unique_ptr<Notifier> Notifier::attach_pinned(const std::string& name,
                                                  const uint8_t instance_id[16], int* why) {
  std::unique_ptr<HeaderPin> pin = HeaderPin::open(name, instance_id, why);
  if (!pin) return nullptr;
  // The mode from the pinned header: the geometry was validated when the
  // caller's handle opened this generation (same instance id).
  std::unique_ptr<Notifier> n = claim(pin->header(), pin->header()->mode, name);
  n->pin_ = std::move(pin);
  return n;
}

std::unique_ptr<Notifier> Notifier::claim(Header* h, uint32_t stream_mode, const std::string& name) {
  std::unique_ptr<Notifier> n(new Notifier());
  n->hdr_ = h;
  n->owner_ = getpid();
  uint64_t token = 0;
  while (token == 0) {
    if (getrandom(&token, sizeof(token), 0) != sizeof(token))
      throw_os("stream '" + name + "': getrandom for a readiness descriptor", errno);
  }
  Fd fd(socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.ok()) throw_os("stream '" + name + "': socket for a readiness descriptor", errno);
  n->path_ = notify_socket_path(n->owner_, token);
  sockaddr_un addr;
  socklen_t len;
  if (!make_address(n->path_, &addr, &len))
    throw Error(ErrorKind::kOS, "stream '" + name + "': socket path too long: " + n->path_,
                ENAMETOOLONG);
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), len) != 0)
    throw_os("stream '" + name + "': bind " + n->path_, errno);
  // Writers need write permission on the socket file: give it the stream's
  // own read/write bits (whoever may write the stream may signal it).
  const mode_t mode = static_cast<mode_t>(stream_mode) & 0666;
  if (chmod(n->path_.c_str(), mode | S_IRUSR | S_IWUSR) != 0) {
    const int err = errno;
    unlink(n->path_.c_str());
    throw_os("stream '" + name + "': chmod " + n->path_, err);
  }

  // Claim a free entry; when there is none, take over a dead owner's.
  // The token is stored before the entry can be armed (arming is a
  // seq_cst exchange after it), so a writer that takes the armed flag
  // reads this token.
  const int32_t pid = static_cast<int32_t>(n->owner_);
  for (int pass = 0; pass < 2; ++pass) {
    for (uint32_t i = 0; i < kMaxNotify; ++i) {
      NotifyEntry& e = h->notify[i];
      int32_t cur = e.pid.load(std::memory_order_acquire);
      if (cur != 0) {
        if (pass == 0 || !entry_dead(cur, e.token.load(std::memory_order_relaxed))) continue;
      }
      if (!e.pid.compare_exchange_strong(cur, pid, std::memory_order_acq_rel)) continue;
      core::disarm(h, e);  // a dead owner's arming no longer counts
      e.token.store(token, std::memory_order_release);
      n->index_ = i;
      n->claimed_ = true;
      n->fd_ = fd.release();
      return n;
    }
  }
  unlink(n->path_.c_str());
  throw Error(ErrorKind::kState, "stream '" + name + "': all " + std::to_string(kMaxNotify) +
                                     " readiness descriptors of this stream are in use by live "
                                     "handles; close some handles' fileno() users first");
}

Notifier::~Notifier() {
  if (fd_ >= 0) ::close(fd_);
  if (!claimed_) return;  // attach failed before claiming an entry (it removed the socket)
  if (getpid() != owner_) return;  // a forked child's copy: the entry is the parent's
  NotifyEntry& e = hdr_->notify[index_];
  forget_sender(static_cast<int32_t>(owner_), e.token.load(std::memory_order_relaxed));
  core::disarm(hdr_, e);
  e.token.store(0, std::memory_order_relaxed);
  e.pid.store(0, std::memory_order_release);
  unlink(path_.c_str());
}

void Notifier::drain() const {
  char buf[64];
  while (recv(fd_, buf, sizeof(buf), MSG_DONTWAIT) > 0) {
  }
}

void Notifier::rearm(uint64_t after) {
  drain();
  NotifyEntry& e = hdr_->notify[index_];
  if (e.armed.exchange(1, std::memory_order_seq_cst) == 0)
    hdr_->armed_readers.fetch_add(1, std::memory_order_seq_cst);
  // Dekker pair with publish_locked (notify.h): re-read seq after arming.
  if ((hdr_->seq.load(std::memory_order_seq_cst) >> 1) > after) {
    // A publication is already there: readable now. Disarm first so no
    // writer queues a second datagram for the same arming.
    core::disarm(hdr_, e);
    send_signal(static_cast<int32_t>(owner_), e.token.load(std::memory_order_relaxed));
  }
}

void Notifier::disarm() {
  core::disarm(hdr_, hdr_->notify[index_]);
  drain();  // after: a signal racing with the disarm is drained too
}

void signal_armed(Header* h) {
  if (h->armed_readers.load(std::memory_order_seq_cst) == 0) return;
  for (uint32_t i = 0; i < kMaxNotify; ++i) {
    NotifyEntry& e = h->notify[i];
    if (e.armed.load(std::memory_order_relaxed) == 0) continue;
    if (!disarm(h, e)) continue;  // another writer took it
    send_signal(e.pid.load(std::memory_order_acquire), e.token.load(std::memory_order_acquire));
  }
}

}  // namespace core
}  // namespace torch_shmem
