// Readiness descriptors: a file descriptor per reader handle that becomes
// readable when the stream has a publication newer than the handle's last
// read, so streams plug into select/poll/epoll loops (selectors, asyncio's
// add_reader) without a thread per stream.
//
// Mechanism. The reader binds a Unix datagram socket at
//   /dev/shm/torch_shmem-notify.<pid>.<token, 16 hex digits>
// and records (pid, token) in a free entry of the stream's header table
// (Header::notify). Arming sets the entry's `armed` flag and counts it in
// Header::armed_readers; a publication (Stream::publish_locked, also abort
// and unlink) that finds armed_readers != 0 clears each armed flag it can
// take (exchange, so one signal per arming) and sends one datagram to that
// socket: the descriptor is then readable until the reader drains it, which
// it does when it arms again after its next read.
//
// Why a socket and not an eventfd: an eventfd cannot be reached by another
// process without passing the descriptor over a socket first, and any
// process may write to a stream. A pathname socket in /dev/shm is reachable
// by every process that can open the stream (same file namespace, across
// network namespaces), a nonblocking sendto never blocks the writer (a full
// queue means "already readable"), and MSG_NOSIGNAL keeps a vanished reader
// from raising SIGPIPE in it. A dead reader leaves its entry and socket
// file behind: the entry is reclaimed when the table is full (its pid is
// gone), the file by purge (its pid is in the name).
//
// Lost-wake freedom is the futex waiters' Dekker pair (seqlock.cpp): the
// reader stores armed, then armed_readers += 1 (seq_cst), then re-reads seq
// (seq_cst); the writer stores seq (release), bumps epoch (seq_cst), then
// loads armed_readers (seq_cst). Either the writer sees the reader armed or
// the reader sees the publication and signals itself.
#pragma once

#include <stdint.h>
#include <sys/types.h>

#include <memory>
#include <string>

#include "stream.h"

namespace torch_shmem {
namespace core {

class Notifier {
 public:
  // Claims an entry of s's table (reclaiming dead processes' entries when
  // it is full) and binds the socket. Throws kState when kMaxNotify live
  // handles already hold descriptors, kOS on socket errors.
  static std::unique_ptr<Notifier> attach(const Stream& s);
  // The same over a private mapping of the header of generation
  // `instance_id` of `name` (HeaderPin), so the notifier may outlive every
  // handle of the stream (asyncio waits that close it from their loop).
  // nullptr (with *why = errno) when the name no longer holds that
  // generation or cannot be mapped writable.
  static std::unique_ptr<Notifier> attach_pinned(const std::string& name,
                                                 const uint8_t instance_id[16], int* why);
  ~Notifier();
  Notifier(const Notifier&) = delete;
  Notifier& operator=(const Notifier&) = delete;

  int fd() const { return fd_; }
  // The count and unlinked flag of the stream it watches.
  uint64_t count() const { return hdr_->seq.load(std::memory_order_acquire) >> 1; }
  bool unlinked() const { return hdr_->unlinked.load(std::memory_order_acquire) != 0; }
  // Makes fd() readable exactly when count > after: drains what earlier
  // signals left, arms the entry, and signals itself when such a
  // publication is already there. (Unlinking the name also signals every
  // armed entry once, so a watcher can notice it.)
  void rearm(uint64_t after);
  // Drains the descriptor and clears the arming: not readable, and no
  // writer signals it, until the next rearm.
  void disarm();

 private:
  Notifier() = default;
  void drain() const;
  static std::unique_ptr<Notifier> claim(Header* h, uint32_t mode, const std::string& name);

  Header* hdr_ = nullptr;
  uint32_t index_ = 0;
  bool claimed_ = false;  // index_ names an entry this object owns
  int fd_ = -1;
  pid_t owner_ = 0;  // the process that bound the socket (a forked child must not release it)
  std::string path_;
  std::unique_ptr<HeaderPin> pin_;  // attach_pinned: the mapping hdr_ points into
};

// Writer side: signals every armed entry of h's table. Cheap when none is
// armed (one load of a line the publication already touched).
void signal_armed(Header* h);

// The socket path of entry (pid, token), for the writer and for purge.
std::string notify_socket_path(int32_t pid, uint64_t token);
constexpr const char* kNotifySocketPrefix = "/dev/shm/torch_shmem-notify.";

}  // namespace core
}  // namespace torch_shmem
