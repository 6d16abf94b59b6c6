// RAII file descriptors and EINTR-safe I/O helpers used by every part of the engine.
#pragma once

#include <cerrno>
#include <cstddef>
#include <string>
#include <system_error>
#include <utility>

#include <fcntl.h>
#include <unistd.h>

namespace fastspawn {

[[noreturn]] inline void throw_errno(const char* what, int err = errno) {
    throw std::system_error(err, std::generic_category(), what);
}

// Owns one file descriptor; closes it on destruction. Move-only.
class Fd {
public:
    Fd() noexcept = default;
    explicit Fd(int fd) noexcept : fd_(fd) {}
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    Fd(Fd&& other) noexcept : fd_(other.release()) {}
    Fd& operator=(Fd&& other) noexcept {
        if (this != &other) reset(other.release());
        return *this;
    }
    ~Fd() { reset(); }

    int get() const noexcept { return fd_; }
    explicit operator bool() const noexcept { return fd_ >= 0; }
    int release() noexcept { return std::exchange(fd_, -1); }
    void reset(int fd = -1) noexcept {
        if (fd_ >= 0) ::close(fd_);  // close() is never retried on Linux, even on EINTR
        fd_ = fd;
    }

private:
    int fd_ = -1;
};

struct Pipe {
    Fd read;
    Fd write;
};

// A pipe whose both ends are O_CLOEXEC; `flags` may add O_NONBLOCK etc.
inline Pipe make_pipe(int flags = 0) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC | flags) != 0) throw_errno("pipe2");
    return Pipe{Fd(fds[0]), Fd(fds[1])};
}

inline void set_nonblocking(int fd, bool on) {
    int fl = ::fcntl(fd, F_GETFL);
    if (fl < 0) throw_errno("fcntl(F_GETFL)");
    fl = on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK);
    if (::fcntl(fd, F_SETFL, fl) < 0) throw_errno("fcntl(F_SETFL)");
}

// Writes as much of [data, data+len) as the fd accepts without blocking (fd must be
// non-blocking) or until done. Returns bytes written; throws on errors other than EAGAIN.
// EPIPE (reader gone) is reported as -1 so callers can drop the rest.
inline long write_some(int fd, const char* data, std::size_t len) {
    std::size_t done = 0;
    while (done < len) {
        ssize_t n = ::write(fd, data + done, len - done);
        if (n > 0) {
            done += static_cast<std::size_t>(n);
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n < 0 && errno == EPIPE) return -1;
        throw_errno("write");
    }
    return static_cast<long>(done);
}

// Appends everything currently readable from a non-blocking fd to `out`.
// Returns true when the writer side is closed (EOF).
inline bool drain(int fd, std::string& out) {
    char buf[65536];
    for (;;) {
        ssize_t n = ::read(fd, buf, sizeof buf);
        if (n > 0) {
            out.append(buf, static_cast<std::size_t>(n));
            continue;
        }
        if (n == 0) return true;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
        throw_errno("read");
    }
}

}  // namespace fastspawn
