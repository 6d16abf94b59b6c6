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

#include <linux/futex.h>

#include "guardian.hpp"

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

    int death_signal = plan.death_signal != 0 ? plan.death_signal : kParentDeathSignal;
    if (plan.program && plan.death_signal == 0) {
        // PR_SET_PDEATHSIG follows the creating thread: from another thread, whose end
        // would kill the program while we live, only when the guardian cannot take it.
        const bool main_thread = ::syscall(SYS_gettid) == ::getpid();
        death_signal = main_thread || !guardian_available() ? SIGKILL : 0;
    }

    int exec_errno = 0;
    ExecArgs args{plan.exe.c_str(),
                  argv.data(),
                  plan.replace_env ? envp.data() : nullptr,
                  plan.redirects.data(),
                  plan.redirects.size(),
                  death_signal,
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
    if (plan.program) guardian_watch(pid);  // still our unreaped child: its pidfd is its own
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

// What glibc 2.36's fork() does for a child (posix/fork.c, sysdeps/nptl/_Fork.c,
// sysdeps/nptl/fork.h), and what the raw clone below does instead. The zygote is
// single-threaded (the zygote refuses to fork otherwise), which decides most of it:
// - The cached thread id (THREAD_SELF->tid, used by raise(), pthread_kill, recursive and
//   error-checking mutexes, robust mutex ownership): glibc passes CLONE_CHILD_SETTID |
//   CLONE_CHILD_CLEARTID with &THREAD_SELF->tid. We pass the same two flags with the
//   thread's clear-child-tid address (PR_GET_TID_ADDRESS), which glibc set to that very
//   field at start-up and at every fork; zygote_fork_check() verifies it holds our tid.
//   CLEARTID also keeps that address registered in the child, so a child that forks
//   again (the helper of a big call) passes the check in turn.
// - The robust-futex list: the kernel drops the registration in a new process; glibc
//   empties the list and registers it again (set_robust_list). We register the head the
//   parent has; its list is empty (checked here and by zygote_fork_check), so it needs no
//   emptying. Without it, a rank dying with a robust process-shared mutex held leaves its
//   peers blocked instead of getting EOWNERDEAD.
// - pthread_once generation (__fork_generation): only matters for a once-routine running
//   in another thread at the fork. Skipped: there is no other thread.
// - malloc arena locks, stdio locks, the NSS database, ld.so's load and TLS locks, the
//   stack cache, __nptl_nthreads, timer and mq_notify helper threads: glibc takes or
//   resets them only because another thread could hold them (for a single-threaded parent
//   it takes none of them either, apart from resetting the two ld.so locks, which no one
//   holds here: we are not inside dlopen). Skipped.
// - rseq: the kernel keeps the registration across a clone without CLONE_VM. Nothing to do.
// - pthread_atfork handlers (prepare, parent, child): not run. Python's own handlers
//   (os.register_at_fork) are run by PyOS_BeforeFork/AfterFork around the clones. The C
//   handlers present in a zygote that imported torch 2.13 and numpy (listed by wrapping
//   __register_atfork with an LD_PRELOAD shim): one child handler of libtorch_python.so
//   (the autograd engine's: the child builds a new engine rather than reuse the parent's
//   device threads) and OpenBLAS's prepare handler (it stops OpenBLAS's thread pool
//   before a fork). Both exist for threads of the parent; a fit zygote has none
//   (single-threaded, no CUDA, no backward run), so the engine and the pool the child
//   inherits are the untouched ones a fresh interpreter has. Skipping them is safe
//   there and only there, which is why an unfit zygote is never used.
//   This engine's own handlers: the zygote owns no Group or guardian while it forks.
// Everything between the clone and the return to Python is async-signal-safe.
pid_t zygote_fork(pid_t owner) {
    int* tid_slot = nullptr;
    long flags = CLONE_PARENT | SIGCHLD;
#ifdef PR_GET_TID_ADDRESS
    if (::prctl(PR_GET_TID_ADDRESS, &tid_slot) == 0 && tid_slot != nullptr)
        flags |= CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID;
#endif
    robust_list_head* head = nullptr;
    std::size_t head_len = 0;
#ifdef SYS_get_robust_list
    if (::syscall(SYS_get_robust_list, 0, &head, &head_len) != 0) head = nullptr;
#endif
    if (head != nullptr && head->list.next != &head->list)
        throw_errno("clone(CLONE_PARENT): this thread holds a robust mutex", EBUSY);
#if defined(__x86_64__) || defined(__i386__)
    const long pid = ::syscall(SYS_clone, flags, nullptr, nullptr, tid_slot, nullptr);
#elif defined(__aarch64__) || defined(__arm__) || defined(__powerpc__)
    const long pid = ::syscall(SYS_clone, flags, nullptr, nullptr, nullptr, tid_slot);
#else
    (void)tid_slot;
    const long pid = ::syscall(SYS_clone, flags & ~static_cast<long>(CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID),
                               nullptr, nullptr, nullptr, nullptr);
#endif
    if (pid < 0) throw_errno("clone(CLONE_PARENT)");
    if (pid == 0) {
#ifdef SYS_set_robust_list
        if (head != nullptr) ::syscall(SYS_set_robust_list, head, head_len);
#endif
        arm_forked_child(owner, false);  // the group: see launch.hpp
        return 0;
    }
    return static_cast<pid_t>(pid);
}

const char* zygote_fork_check() noexcept {
#ifdef PR_GET_TID_ADDRESS
    int* tid_slot = nullptr;
    if (::prctl(PR_GET_TID_ADDRESS, &tid_slot) != 0)
        return "prctl(PR_GET_TID_ADDRESS) is not available (kernel without CONFIG_CHECKPOINT_RESTORE)";
    if (tid_slot == nullptr) return "no clear-child-tid address is registered for the zygote's thread";
    if (*tid_slot != static_cast<int>(::syscall(SYS_gettid)))
        return "the clear-child-tid address does not hold the thread id (not glibc's cached tid)";
#else
    return "prctl(PR_GET_TID_ADDRESS) is not known at build time";
#endif
#ifdef SYS_get_robust_list
    robust_list_head* head = nullptr;
    std::size_t len = 0;
    if (::syscall(SYS_get_robust_list, 0, &head, &len) != 0) return "get_robust_list failed";
    if (head == nullptr || len != sizeof(robust_list_head)) return "no robust-futex list is registered";
    if (head->list.next != &head->list) return "the zygote's thread holds a robust mutex";
    return nullptr;
#else
    return "get_robust_list is not known at build time";
#endif
}

bool enter_child(const ChildFds& fds) noexcept {
    // The group move comes last: until the caller knows this pid (the announcement), the
    // child stays in the zygote's process group, where the caller's engine finds it (and
    // reaps it) should it die before announcing itself (see Group::set_reap_strays).
    for (const auto& [from, to] : fds.dup2s) {
        if (to < 0 || to > 2) {  // any other target would be an inheritable fd
            errno = EBADF;
            return false;
        }
        if (::dup2(from, to) < 0) return false;
    }
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
    ::setpgid(0, 0);
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
