// The guardian (see guardian.hpp for what it promises).
//
// Why this shape:
// - clone(CLONE_VM) rather than fork: a fork of a big owner (torch imported: hundreds of
//   MiB) copies its page tables and, for as long as the copy lives, turns every page the
//   owner writes into a copy-on-write fault. A CLONE_VM process shares the memory and
//   costs one stack. The price: it must touch nothing of the owner's memory but its own
//   region, so it runs on raw system calls only (inline assembly: no errno, no TLS, no
//   locks, no malloc), with its own TLS pointer and no stack protector.
// - A sibling, not a child: the owner creates it through an intermediate (CLONE_VFORK,
//   so the owner thread waits for it) that clones the guardian and exits at once; the
//   owner reaps the intermediate and the guardian is reparented to init (or the nearest
//   subreaper). Nothing is left for the owner to reap, and the owner's children stay
//   exactly the ones it started.
// - Its stack region is freed only once the kernel says the guardian is gone:
//   CLONE_CHILD_CLEARTID clears a word in the region at its exit (and wakes a futex on
//   it), which guardian_shutdown waits for; a region whose guardian may still run is
//   never unmapped.
// - Owner death is the end of file on a SOCK_SEQPACKET socket whose owner end is
//   close-on-exec and closed in fork children (pthread_atfork, registered here), so only
//   the owner's exit or guardian_shutdown closes the last copy. Commands are fixed-size
//   messages; a watch carries a pidfd opened by the owner while the program is certainly
//   its unreaped child (SCM_RIGHTS), so the guardian never names a process by a pid that
//   could have been reused.
#include "guardian.hpp"

#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstring>

#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "launch.hpp"

#if defined(__x86_64__) || defined(__aarch64__)
#define FASTSPAWN_GUARDIAN_RAW 1
#endif

namespace fastspawn {
namespace {

enum : std::int32_t { kWatch = 1, kForget = 2 };

struct Command {
    std::int32_t op;
    std::int32_t pid;
};

#ifdef FASTSPAWN_GUARDIAN_RAW

// The region: [header page | TLS block | intermediate stack | guardian stack].
constexpr std::size_t kPage = 4096;
constexpr std::size_t kTlsSize = 16 * 1024;
constexpr std::size_t kIntermediateStack = 16 * 1024;
constexpr std::size_t kGuardianStack = 96 * 1024;
constexpr std::size_t kRegionSize = kPage + kTlsSize + kIntermediateStack + kGuardianStack;

struct Header {
    int sock;      // the guardian's end of the socket
    int tid;       // the guardian's pid: set by clone, cleared by the kernel at its exit
    void* tls;     // the guardian's thread pointer (inside the TLS block)
};

#if defined(__has_attribute)
#if __has_attribute(no_stack_protector)
#define FASTSPAWN_NO_SSP __attribute__((no_stack_protector))
#endif
#endif
#ifndef FASTSPAWN_NO_SSP
#define FASTSPAWN_NO_SSP __attribute__((optimize("no-stack-protector")))
#endif

// A system call without errno (the result is -errno on failure) or any other libc state.
FASTSPAWN_NO_SSP inline long raw(long n, long a = 0, long b = 0, long c = 0, long d = 0, long e = 0) {
#if defined(__x86_64__)
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
    return ret;
#else
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = e;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4) : "memory", "cc");
    return x0;
#endif
}

template <typename T>
long arg(T* p) {
    return static_cast<long>(reinterpret_cast<std::uintptr_t>(p));
}

struct Watched {
    int pid;
    int fd;  // pidfd, or -1 when the kernel has none (then kill by pid)
};

// Closes every fd but `keep` (the fd table is a copy of the owner's).
FASTSPAWN_NO_SSP void close_all_but(int keep) {
#ifdef SYS_close_range
    bool ok = true;
    if (keep > 0) ok = raw(SYS_close_range, 0, keep - 1, 0) == 0;
    if (ok && raw(SYS_close_range, keep + 1, ~0U, 0) == 0) return;
#endif
    struct {
        unsigned long cur, max;
    } lim{1024, 1024};
    raw(SYS_prlimit64, 0, RLIMIT_NOFILE, 0, arg(&lim));
    const unsigned long top = lim.cur > (1UL << 20) ? (1UL << 20) : lim.cur;
    for (unsigned long fd = 0; fd < top; ++fd)
        if (static_cast<int>(fd) != keep) raw(SYS_close, static_cast<long>(fd));
}

// The guardian's whole life. Shares the owner's memory: only raw system calls, only its
// own stack and region.
FASTSPAWN_NO_SSP int guardian_main(void* raw_header) {
    auto* h = static_cast<Header*>(raw_header);
    const int sock = h->sock;
    const unsigned long all_signals = ~0UL;
    raw(SYS_rt_sigprocmask, SIG_SETMASK, arg(&all_signals), 0, sizeof all_signals);
    raw(SYS_setsid);  // out of the owner's process group and session: kill(-pgid) and hangups miss it
    static const char name[] = "fastspawn-guard";
    raw(SYS_prctl, PR_SET_NAME, arg(name));
    static const char root[] = "/";
    raw(SYS_chdir, arg(root));  // holds no directory busy
    close_all_but(sock);
    // Survive an OOM kill of the owner, whose memory it shares (needs CAP_SYS_RESOURCE).
    static const char oom_path[] = "/proc/self/oom_score_adj";
    static const char oom_min[] = "-1000";
    const long oom = raw(SYS_openat, AT_FDCWD, arg(oom_path), O_WRONLY | O_CLOEXEC);
    if (oom >= 0) {
        raw(SYS_write, oom, arg(oom_min), sizeof oom_min - 1);
        raw(SYS_close, oom);
    }

    Watched watched[kGuardianCapacity];
    std::size_t count = 0;
    for (;;) {
        Command cmd{0, 0};
        iovec iov{&cmd, sizeof cmd};
        alignas(cmsghdr) char control[CMSG_SPACE(4 * sizeof(int))];
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        const long n = raw(SYS_recvmsg, sock, arg(&msg), MSG_CMSG_CLOEXEC);
        if (n == -EINTR || n == -ENOMEM || n == -ENOBUFS) continue;
        if (n <= 0) break;  // end of file: the owner is gone (or shut us down)
        int fd = -1;
        const cmsghdr* c = msg.msg_controllen >= sizeof(cmsghdr) ? reinterpret_cast<cmsghdr*>(control) : nullptr;
        if (c != nullptr && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
            c->cmsg_len >= CMSG_LEN(sizeof(int))) {
            const int* fds = reinterpret_cast<const int*>(CMSG_DATA(c));
            const std::size_t nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            fd = fds[0];
            for (std::size_t i = 1; i < nfds; ++i) raw(SYS_close, fds[i]);
        }
        std::size_t at = 0;
        while (at < count && watched[at].pid != cmd.pid) ++at;
        if (n == static_cast<long>(sizeof cmd) && cmd.op == kWatch && cmd.pid > 0 && at == count &&
            count < kGuardianCapacity) {
            watched[count++] = Watched{cmd.pid, fd};
            continue;
        }
        if (fd >= 0) raw(SYS_close, fd);  // a repeated watch, or a malformed command
        if (n == static_cast<long>(sizeof cmd) && cmd.op == kForget && at < count) {
            if (watched[at].fd >= 0) raw(SYS_close, watched[at].fd);
            watched[at] = watched[--count];
        }
    }
    // Process groups first (while their leaders are still unreaped zombies or alive, the
    // group ids cannot have been reused), then each program through its pidfd.
    for (std::size_t i = 0; i < count; ++i) raw(SYS_kill, -watched[i].pid, SIGKILL);
    for (std::size_t i = 0; i < count; ++i) {
#ifdef SYS_pidfd_send_signal
        if (watched[i].fd >= 0 && raw(SYS_pidfd_send_signal, watched[i].fd, SIGKILL, 0, 0) == 0) continue;
#endif
        if (watched[i].fd < 0) raw(SYS_kill, watched[i].pid, SIGKILL);
    }
    raw(SYS_exit_group, 0);
    return 0;
}

// The intermediate: the owner's thread waits for it (CLONE_VFORK), so the libc clone
// wrapper may use that thread's state. It makes the guardian and exits.
int intermediate_main(void* raw_header) {
    auto* h = static_cast<Header*>(raw_header);
    char* top = reinterpret_cast<char*>(h) + kRegionSize;
    const int flags = CLONE_VM | CLONE_PARENT_SETTID | CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID |
                      CLONE_SETTLS | SIGCHLD;
    ::clone(guardian_main, top, flags, h, &h->tid, h->tls, &h->tid);
    ::_exit(0);
}

// Owner-side state. A plain pthread mutex: the fork child re-initializes it (its copy
// may have been taken by another thread at the time of the fork).
struct OwnerState {
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    int sock = -1;             // the owner's end; -1: no guardian
    Header* region = nullptr;  // the running guardian's region
    pid_t watched[kGuardianCapacity] = {};
    std::size_t count = 0;
};

OwnerState g_state;

class Locked {
public:
    Locked() { ::pthread_mutex_lock(&g_state.mu); }
    ~Locked() { ::pthread_mutex_unlock(&g_state.mu); }
    Locked(const Locked&) = delete;
    Locked& operator=(const Locked&) = delete;
};

void register_atfork_once() noexcept {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    ::pthread_once(&once, [] { ::pthread_atfork(nullptr, nullptr, guardian_after_fork_child); });
}

// Waits up to `seconds` for the guardian of `h` to be gone (its tid word cleared).
bool wait_gone(Header* h, int seconds) noexcept {
    timespec end{};
    ::clock_gettime(CLOCK_MONOTONIC, &end);
    end.tv_sec += seconds;
    for (;;) {
        const int tid = __atomic_load_n(&h->tid, __ATOMIC_ACQUIRE);
        if (tid == 0) return true;
        timespec now{};
        ::clock_gettime(CLOCK_MONOTONIC, &now);
        timespec left{end.tv_sec - now.tv_sec, end.tv_nsec - now.tv_nsec};
        if (left.tv_nsec < 0) {
            left.tv_nsec += 1000000000L;
            --left.tv_sec;
        }
        if (left.tv_sec < 0) return false;
        // The kernel's wake at exit is a shared (not private) futex wake.
        ::syscall(SYS_futex, &h->tid, FUTEX_WAIT, tid, &left, nullptr, 0);
    }
}

// Closes the owner's end (the guardian then kills what it watches and exits) and frees
// the region once the guardian is gone. Keeps the list of watched pids.
void stop_locked() noexcept {
    if (g_state.sock < 0) return;
    ::close(g_state.sock);
    g_state.sock = -1;
    Header* h = g_state.region;
    g_state.region = nullptr;
    if (h != nullptr && wait_gone(h, 1)) ::munmap(h, kRegionSize);  // else: leaked, never reused
}

bool start_locked() noexcept {
    if (g_state.sock >= 0) return true;
    void* map = ::mmap(nullptr, kRegionSize, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (map == MAP_FAILED) return false;
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
        ::munmap(map, kRegionSize);
        return false;
    }
    g_state.sock = sv[0];  // at once: a fork child's atfork handler closes it
    auto* h = static_cast<Header*>(map);
    h->sock = sv[1];
    h->tid = 0;
    char* tls_block = static_cast<char*>(map) + kPage;
    h->tls = tls_block + kTlsSize / 2;  // stray TLS reads at either sign of offset stay inside
    *static_cast<void**>(h->tls) = h->tls;  // x86-64 convention: the thread pointer points to itself
    char* intermediate_top = tls_block + kTlsSize + kIntermediateStack;

    sigset_t all;
    sigset_t old;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, &old);  // inherited: both start with all blocked
    const pid_t pid = ::clone(intermediate_main, intermediate_top, CLONE_VM | CLONE_VFORK | SIGCHLD, h);
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    if (pid > 0) {
        siginfo_t info{};
        while (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED) != 0 && errno == EINTR) {
        }
    }
    ::close(sv[1]);
    if (pid <= 0 || __atomic_load_n(&h->tid, __ATOMIC_ACQUIRE) <= 0) {
        ::close(g_state.sock);
        g_state.sock = -1;
        ::munmap(map, kRegionSize);
        return false;
    }
    g_state.region = h;
    register_atfork_once();
    return true;
}

// 0 on success, else errno.
int send_locked(std::int32_t op, pid_t pid) noexcept {
    Command cmd{op, static_cast<std::int32_t>(pid)};
    iovec iov{&cmd, sizeof cmd};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    Fd pidfd;
    if (op == kWatch) pidfd = open_pidfd(pid);
    if (pidfd) {
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        const int fd = pidfd.get();
        std::memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    ssize_t n;
    do {
        n = ::sendmsg(g_state.sock, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n == static_cast<ssize_t>(sizeof cmd) ? 0 : (n < 0 ? errno : EIO);
}

std::size_t find_locked(pid_t pid) noexcept {
    std::size_t at = 0;
    while (at < g_state.count && g_state.watched[at] != pid) ++at;
    return at;
}

// A guardian found dead (someone killed it): a new one, told every pid still watched.
bool restart_locked() noexcept {
    stop_locked();
    if (!start_locked()) return false;
    for (std::size_t i = 0; i < g_state.count; ++i)
        if (send_locked(kWatch, g_state.watched[i]) != 0) return false;
    return true;
}

#endif  // FASTSPAWN_GUARDIAN_RAW

}  // namespace

#ifdef FASTSPAWN_GUARDIAN_RAW

bool guardian_available() noexcept {
    Locked lock;
    return g_state.count < kGuardianCapacity && start_locked();
}

void guardian_watch(pid_t pid) noexcept {
    if (pid <= 0) return;
    Locked lock;
    if (find_locked(pid) < g_state.count || g_state.count >= kGuardianCapacity) return;
    if (!start_locked()) return;
    int err = send_locked(kWatch, pid);
    if (err == EPIPE || err == ECONNRESET || err == ENOTCONN) {
        if (!restart_locked()) return;
        err = send_locked(kWatch, pid);
    }
    if (err == 0) g_state.watched[g_state.count++] = pid;
}

void guardian_forget(pid_t pid) noexcept {
    Locked lock;
    const std::size_t at = find_locked(pid);
    if (at == g_state.count) return;
    g_state.watched[at] = g_state.watched[--g_state.count];
    if (g_state.sock >= 0) send_locked(kForget, pid);
}

void guardian_shutdown() noexcept {
    Locked lock;
    stop_locked();
    g_state.count = 0;
}

void guardian_after_fork_child() noexcept {
    // Only system calls and plain stores: this runs in a fork child of a threaded owner.
    if (g_state.sock >= 0) ::close(g_state.sock);
    g_state.sock = -1;
    if (g_state.region != nullptr) ::munmap(g_state.region, kRegionSize);  // our private copy
    g_state.region = nullptr;
    g_state.count = 0;
    g_state.mu = PTHREAD_MUTEX_INITIALIZER;
}

pid_t guardian_pid() noexcept {
    Locked lock;
    return g_state.region != nullptr ? __atomic_load_n(&g_state.region->tid, __ATOMIC_ACQUIRE) : 0;
}

#else  // no guardian on this architecture: programs rely on PR_SET_PDEATHSIG=SIGKILL

bool guardian_available() noexcept { return false; }
void guardian_watch(pid_t) noexcept {}
void guardian_forget(pid_t) noexcept {}
void guardian_shutdown() noexcept {}
void guardian_after_fork_child() noexcept {}
pid_t guardian_pid() noexcept { return 0; }

#endif

}  // namespace fastspawn
