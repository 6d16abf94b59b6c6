// Creating one child: a fork of the caller, or a fresh program started with
// clone(CLONE_VM | CLONE_VFORK) + execve. Also the child-side guard that makes every
// child (and what it starts) die with the process that created it.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <signal.h>
#include <sys/types.h>

#include "fd.hpp"

namespace fastspawn {

// The parent-death signal. Its default action is "ignore", so before a child has
// installed its handler (see arm_parent_death) the signal is harmless; the handler
// then decides whether the owner process really died (see launch.cpp).
constexpr int kParentDeathSignal = SIGURG;

struct ExecPlan {
    std::string exe;                // path of the program (no PATH search)
    std::vector<std::string> argv;  // argv[0] included
    std::vector<int> keep_fds;      // inherited at the same numbers; everything else >= 3 is closed
    pid_t owner = 0;                // the process whose death must kill the child
    // The child's whole environment ("KEY=value" each); without it, the caller's.
    bool replace_env = false;
    std::vector<std::string> env;
    // (source fd in the caller, target fd in the child) for the child's stdio (targets
    // 0..2). Sources must not be targets of an earlier pair.
    std::vector<std::pair<int, int>> redirects;
    // Sent when the creating thread's process dies. The default, kParentDeathSignal,
    // is for children that install its handler (ours); a foreign program ignores it.
    int death_signal = 0;
    // A foreign program (it never installs our handler). Unless death_signal says
    // otherwise it gets SIGKILL as parent-death signal when started from the main thread
    // (or when the guardian cannot take it), and the guardian watches it from its exec
    // on (see guardian.hpp). Whoever reaps it calls guardian_forget(pid) first.
    bool program = false;
};

// Starts `plan` in a new process group led by the child. Returns the child's pid.
// Throws std::system_error if the program could not be executed (errno of execve).
// The child inherits exactly 0..2 (after `redirects`) and `keep_fds`.
pid_t exec_child(const ExecPlan& plan);

// fork()s the calling process. In the child (return value 0) the guard is already
// armed: own process group, parent-death signal, owner checked. Throws on failure.
pid_t fork_child(pid_t owner);

// In a zygote: clone(CLONE_PARENT) so that the new process is a child of the zygote's
// parent (the caller), exactly like one the caller forked itself. Returns 0 in the new
// process, whose guard against `owner` (the caller) is armed and which has what glibc's
// fork gives a child and matters here (see launch.cpp). Throws on failure (for example
// EPERM where a seccomp policy refuses the flag, EBUSY when this thread holds a robust
// mutex). Call only where zygote_fork_check() returned nullptr.
// The new process stays in the zygote's process group: it may fork siblings in turn
// (nobody but the caller could move those into groups of their own), and each must
// call setpgid(0, 0) once it has forked what it forks. A process that led its own group
// while forking could otherwise signal its group and hit a sibling not yet moved out.
pid_t zygote_fork(pid_t owner);

// Whether this process can use zygote_fork: nullptr when it can (glibc's cached thread
// id lives at the thread's clear-child-tid address, and an empty robust-futex list is
// registered), else why not. A zygote that gets a reason is unfit.
const char* zygote_fork_check() noexcept;

// What a new zygote child does before any Python code runs in it, in this order: dup2
// each (source, target) pair (targets 0..2 only: the only fds that lose close-on-exec),
// close `close_fds`, write its pid (native int32) to `announce_fd`, from which the caller
// adopts it, then move into a process group of its own (last: a child that dies before
// announcing itself is still in the zygote's group, where the caller's engine reaps it).
struct ChildFds {
    int announce_fd = -1;
    std::vector<std::pair<int, int>> dup2s;
    std::vector<int> close_fds;
};

// Async-signal-safe. Applies `fds` in the calling process (see ChildFds); returns
// false, with errno set, if a dup2 (EBADF: a target outside 0..2) or the announcement failed.
bool enter_child(const ChildFds& fds) noexcept;

// The calling process's umask from /proc/self/status (no umask() round trip, which
// would change it for other threads meanwhile); -1 when /proc does not say.
int current_umask() noexcept;

// For a process that was exec'd by exec_child: installs the handler behind the
// parent-death signal. Returns false when `owner` is already gone.
bool arm_parent_death(pid_t owner) noexcept;

// A pidfd for `pid`, or an empty Fd when the kernel has none (ENOSYS) or refuses it.
Fd open_pidfd(pid_t pid) noexcept;

// Whether pidfd_open works in this process (tried once).
bool pidfd_supported() noexcept;

}  // namespace fastspawn
