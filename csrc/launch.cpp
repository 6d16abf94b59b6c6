#include "launch.hpp"

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <memory>

#include <fcntl.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace fastspawn {
namespace {

// Owner pid for the parent-death handler of *this* process. Only written in a child
// (after fork, or at bootstrap after exec), never in a process that launches.
volatile sig_atomic_t g_owner = 0;

extern "C" void on_parent_death(int) {
    const int saved = errno;
    // PR_SET_PDEATHSIG fires when the *thread* that created us exits. If the owner
    // process is still our parent, only one of its threads ended: nothing to do.
    if (::getppid() != static_cast<pid_t>(g_owner)) {
        const pid_t self = ::getpid();
        if (::getpgrp() == self) ::kill(-self, SIGKILL);  // what we started goes too
        ::kill(self, SIGKILL);
    }
    errno = saved;
}

void install_handler() noexcept {
    struct sigaction sa {};
    sa.sa_handler = on_parent_death;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    ::sigaction(kParentDeathSignal, &sa, nullptr);
}

// Async-signal-safe: own process group and parent-death signal; false if owner gone.
bool guard_child(pid_t owner, int death_signal = kParentDeathSignal, bool own_group = true) noexcept {
    if (own_group) ::setpgid(0, 0);
    ::prctl(PR_SET_PDEATHSIG, death_signal);
    return ::getppid() == owner;
}

// In a new fork (its own memory): the handler, the process group, the parent-death
// signal. A child whose owner is already gone ends here.
void arm_forked_child(pid_t owner, bool own_group = true) noexcept {
    g_owner = owner;
    install_handler();
    if (!guard_child(owner, kParentDeathSignal, own_group)) ::kill(::getpid(), SIGKILL);
}

int sys_close_range(unsigned first, unsigned last) noexcept {
#ifdef SYS_close_range
    return static_cast<int>(::syscall(SYS_close_range, first, last, 0u));
#else
    (void)first;
    (void)last;
    errno = ENOSYS;
    return -1;
#endif
}

// Closes every fd >= 3 not in the sorted `keep` list. Async-signal-safe.
void close_other_fds(const int* keep, std::size_t nkeep, int max_fd) noexcept {
    unsigned next = 3;
    for (std::size_t i = 0; i <= nkeep; ++i) {
        const unsigned stop = i < nkeep ? static_cast<unsigned>(keep[i]) : UINT_MAX;
        if (stop < next) continue;
        if (stop > next) {
            const unsigned last = stop == UINT_MAX ? UINT_MAX : stop - 1;
            if (sys_close_range(next, last) != 0) {
                const unsigned end = std::min<unsigned>(last, static_cast<unsigned>(max_fd));
                for (unsigned fd = next; fd <= end; ++fd) ::close(static_cast<int>(fd));
            }
        }
        if (stop == UINT_MAX) break;
        next = stop + 1;
    }
}

struct ExecArgs {
    const char* exe;
    char* const* argv;
    char* const* envp;  // null: the caller's environ at the time of execve
    const std::pair<int, int>* redirects;
    std::size_t nredirects;
    int death_signal;
    const int* keep;
    std::size_t nkeep;
    int max_fd;
    pid_t owner;
    int* exec_errno;  // shared with the parent (CLONE_VM): written only on failure
};

// Runs in the clone(CLONE_VM|CLONE_VFORK) child on its own stack. Only system calls:
// the parent's memory is shared, so nothing here may allocate, lock or write globals.
extern "C" int exec_trampoline(void* raw) {
    const auto* a = static_cast<const ExecArgs*>(raw);
    // Handlers of the parent must never run here: reset every caught signal first.
    for (int sig = 1; sig < NSIG; ++sig) {
        struct sigaction old {};
        if (::sigaction(sig, nullptr, &old) != 0) continue;
        const bool ignored_by_python = (sig == SIGPIPE || sig == SIGXFSZ);
        if (old.sa_handler != SIG_DFL && (old.sa_handler != SIG_IGN || ignored_by_python)) {
            struct sigaction dfl {};
            dfl.sa_handler = SIG_DFL;
            ::sigaction(sig, &dfl, nullptr);
        }
    }
    if (!guard_child(a->owner, a->death_signal)) ::_exit(127);
    for (std::size_t i = 0; i < a->nredirects; ++i) {
        const auto [from, to] = a->redirects[i];
        if ((from == to ? ::fcntl(to, F_SETFD, 0) : ::dup2(from, to)) < 0) {
            *a->exec_errno = errno;
            ::_exit(127);
        }
    }
    for (std::size_t i = 0; i < a->nkeep; ++i) ::fcntl(a->keep[i], F_SETFD, 0);
    close_other_fds(a->keep, a->nkeep, a->max_fd);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::execve(a->exe, a->argv, a->envp != nullptr ? a->envp : environ);
    *a->exec_errno = errno;
    ::_exit(127);
}

// Blocks every signal in the calling thread for its lifetime (restores on scope exit).
class BlockAllSignals {
public:
    BlockAllSignals() {
        sigset_t all;
        sigfillset(&all);
        ::pthread_sigmask(SIG_SETMASK, &all, &old_);
    }
    ~BlockAllSignals() { ::pthread_sigmask(SIG_SETMASK, &old_, nullptr); }
    BlockAllSignals(const BlockAllSignals&) = delete;
    BlockAllSignals& operator=(const BlockAllSignals&) = delete;

private:
    sigset_t old_{};
};

}  // namespace

pid_t exec_child(const ExecPlan& plan) {
    std::vector<char*> argv;
    argv.reserve(plan.argv.size() + 1);
    for (const auto& s : plan.argv) argv.push_back(const_cast<char*>(s.c_str()));
    argv.push_back(nullptr);
    std::vector<char*> envp;
    if (plan.replace_env) {
        envp.reserve(plan.env.size() + 1);
        for (const auto& s : plan.env) envp.push_back(const_cast<char*>(s.c_str()));
        envp.push_back(nullptr);
    }
    for (const auto& [from, to] : plan.redirects) {
        if (to < 0 || to > 2 || ::fcntl(from, F_GETFD) < 0) throw_errno("stdio fd for the child", EBADF);
    }

    std::vector<int> keep = plan.keep_fds;
    std::sort(keep.begin(), keep.end());
    keep.erase(std::unique(keep.begin(), keep.end()), keep.end());
    for (int fd : keep) {
        if (fd < 0 || ::fcntl(fd, F_GETFD) < 0) throw_errno("fd to pass to the child", EBADF);
    }
    struct rlimit rl {};
    int max_fd = 65535;
    if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
        max_fd = static_cast<int>(std::min<rlim_t>(rl.rlim_cur, INT_MAX));

    int exec_errno = 0;
    ExecArgs args{plan.exe.c_str(),
                  argv.data(),
                  plan.replace_env ? envp.data() : nullptr,
                  plan.redirects.data(),
                  plan.redirects.size(),
                  plan.death_signal != 0 ? plan.death_signal : kParentDeathSignal,
                  keep.data(),
                  keep.size(),
                  max_fd,
                  plan.owner,
                  &exec_errno};

    constexpr std::size_t kStack = 128 * 1024;
    auto stack = std::make_unique<std::uint8_t[]>(kStack);
    auto top = reinterpret_cast<std::uintptr_t>(stack.get() + kStack);
    top &= ~static_cast<std::uintptr_t>(15);

    pid_t pid;
    {
        BlockAllSignals blocked;
        pid = ::clone(exec_trampoline, reinterpret_cast<void*>(top),
                      CLONE_VM | CLONE_VFORK | SIGCHLD, &args);
    }
    if (pid < 0) throw_errno("clone");
    // CLONE_VFORK: the child has exec'd or exited by now.
    ::setpgid(pid, pid);  // may fail with EACCES after exec; the child did it itself
    if (exec_errno != 0) {
        siginfo_t info{};
        ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED);
        throw_errno(plan.exe.c_str(), exec_errno);
    }
    return pid;
}

pid_t fork_child(pid_t owner) {
    const pid_t pid = ::fork();
    if (pid < 0) throw_errno("fork");
    if (pid == 0) {
        arm_forked_child(owner);
        return 0;
    }
    ::setpgid(pid, pid);
    return pid;
}

pid_t zygote_fork(pid_t owner) {
    // A raw clone skips glibc's fork bookkeeping; the zygote is single-threaded, so no
    // lock can be held. glibc caches the thread id in its thread descriptor: ask the
    // kernel to write the child's tid there (where glibc itself asked it to clear it).
    int* tid_slot = nullptr;
    long flags = CLONE_PARENT | SIGCHLD;
#ifdef PR_GET_TID_ADDRESS
    if (::prctl(PR_GET_TID_ADDRESS, &tid_slot) == 0 && tid_slot != nullptr) flags |= CLONE_CHILD_SETTID;
#endif
#if defined(__x86_64__) || defined(__i386__)
    const long pid = ::syscall(SYS_clone, flags, nullptr, nullptr, tid_slot, nullptr);
#elif defined(__aarch64__) || defined(__arm__) || defined(__powerpc__)
    const long pid = ::syscall(SYS_clone, flags, nullptr, nullptr, nullptr, tid_slot);
#else
    (void)tid_slot;
    const long pid = ::syscall(SYS_clone, flags & ~static_cast<long>(CLONE_CHILD_SETTID), nullptr,
                               nullptr, nullptr, nullptr);
#endif
    if (pid < 0) throw_errno("clone(CLONE_PARENT)");
    if (pid == 0) {
        arm_forked_child(owner, false);  // the group: see launch.hpp
        return 0;
    }
    return static_cast<pid_t>(pid);
}

bool enter_child(const ChildFds& fds) noexcept {
    ::setpgid(0, 0);
    for (const auto& [from, to] : fds.dup2s)
        if (::dup2(from, to) < 0) return false;
    for (const int fd : fds.close_fds) ::close(fd);
    const std::int32_t pid = ::getpid();
    const char* data = reinterpret_cast<const char*>(&pid);
    std::size_t left = sizeof pid;
    while (left > 0) {  // a fresh pipe takes 4 bytes at once; EINTR is the only retry
        const ssize_t n = ::write(fds.announce_fd, data, left);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false;
        data += n;
        left -= static_cast<std::size_t>(n);
    }
    return true;
}

int current_umask() noexcept {
    const Fd fd(::open("/proc/self/status", O_RDONLY | O_CLOEXEC));
    if (!fd) return -1;
    std::array<char, 4096> buf{};
    std::size_t used = 0;
    while (used < buf.size() - 1) {
        const ssize_t n = ::read(fd.get(), buf.data() + used, buf.size() - 1 - used);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        used += static_cast<std::size_t>(n);
    }
    const char* line = std::strstr(buf.data(), "\nUmask:");
    if (line == nullptr) return -1;
    line += 7;
    while (*line == ' ' || *line == '\t') ++line;
    int mask = 0;
    int digits = 0;
    for (; *line >= '0' && *line <= '7'; ++line, ++digits) mask = mask * 8 + (*line - '0');
    return digits > 0 ? mask : -1;
}

bool arm_parent_death(pid_t owner) noexcept {
    g_owner = owner;
    install_handler();
    ::prctl(PR_SET_PDEATHSIG, kParentDeathSignal);  // already set before exec; harmless
    return ::getppid() == owner;
}

Fd open_pidfd(pid_t pid) noexcept {
#ifdef SYS_pidfd_open
    const long fd = ::syscall(SYS_pidfd_open, pid, 0u);
    if (fd >= 0) {
        ::fcntl(static_cast<int>(fd), F_SETFD, FD_CLOEXEC);  // pidfds are CLOEXEC already
        return Fd(static_cast<int>(fd));
    }
#else
    (void)pid;
#endif
    return Fd();
}

bool pidfd_supported() noexcept {
    static const bool ok = static_cast<bool>(open_pidfd(::getpid()));
    return ok;
}

}  // namespace fastspawn
