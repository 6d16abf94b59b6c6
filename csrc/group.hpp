// Group: the N children of one call. It owns them: it watches them (one epoll set over
// pidfds and result pipes), stops them, reaps them, and destroying it ends them.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <sys/types.h>

#include "fd.hpp"
#include "launch.hpp"

namespace fastspawn {

// What a child left behind: how it ended and every byte it wrote to its result pipe.
struct ExitInfo {
    int rank = -1;
    pid_t pid = -1;
    int exitcode = 0;  // multiprocessing convention: >= 0 exit status, < 0 killed by -signal
    std::string output;
};

using Chunk = std::shared_ptr<const std::string>;

// How start_exec runs a program beyond its argv.
struct ExecOptions {
    // Our bootstrap: append CONTROL_FD RESULT_FD OWNER_PID and hand over those pipes.
    // A foreign program gets neither (its result pipe just reads as closed).
    bool protocol = true;
    bool replace_env = false;              // then `env` ("KEY=value" each) is all it gets
    std::vector<std::string> env;
    std::vector<std::pair<int, int>> redirects;  // (caller fd, child stdio fd 0..2)
    int death_signal = 0;                  // 0: kParentDeathSignal (see launch.hpp)
};

// Called when a wait was interrupted by a signal; returning true ends the wait early.
using InterruptCheck = std::function<bool()>;

class Group {
public:
    // use_pidfd=false forces the thread watcher (also used when the kernel has no pidfd).
    Group(int nprocs, bool use_pidfd);
    ~Group();
    Group(const Group&) = delete;
    Group& operator=(const Group&) = delete;

    int size() const noexcept { return static_cast<int>(slots_.size()); }
    const char* watch_mode() const noexcept { return use_pidfd_ ? "pidfd" : "thread"; }

    // Starts `rank` as `exe argv... CONTROL_FD RESULT_FD OWNER_PID`, with `pass_fds` and
    // those two fds inherited at their numbers, then sends `input` on the control pipe
    // (see ExecOptions for foreign programs, environment and stdio).
    void start_exec(int rank, const std::string& exe, const std::vector<std::string>& argv,
                    const std::vector<int>& pass_fds, std::vector<Chunk> input,
                    const ExecOptions& options = {});

    // Forks the caller for `rank`. In the parent returns the pid. In the child returns 0
    // and sets `control_fd`/`result_fd` (the child owns them); the group is then inert there.
    pid_t start_fork(int rank, int& control_fd, int& result_fd);

    // Children made elsewhere (by the zygote, as our own children): opens the pipes of
    // `rank` and returns the child's ends (control read, result write). The caller hands
    // them over and closes its copies.
    std::pair<int, int> open_channels(int rank);

    // Waits (up to `timeout` s) for every rank with open channels to announce itself: a
    // child's first 4 bytes on its result pipe are its pid (native int32). A pipe that
    // closes first means that rank was never started. Children that are not ours are
    // refused. Returns the ranks now watched.
    std::vector<int> adopt(double timeout, const InterruptCheck& interrupted);

    // Exits are logged in the order they were reaped; every caller sees the same log.
    // Waits until the log holds more than `known` exits (or every child has exited, with
    // `all`), or `timeout` seconds pass (< 0: no limit). Returns the log from `known` on.
    // Any number of threads may wait at once: each reap wakes every waiter.
    std::vector<ExitInfo> wait(double timeout, bool all, std::size_t known,
                               const InterruptCheck& interrupted);

    // Sends `sig` to `rank` (to its whole process group with `group`) unless already
    // reaped. Returns whether it was sent.
    bool send_signal(int rank, int sig, bool group = false);

    // From now on, reaping a child first SIGKILLs what is left in its process group.
    void begin_stop() noexcept;

    // SIGTERM to every live child, up to `grace` seconds, then SIGKILL to their process
    // groups; reaps all (see wait() for the log).
    void stop(double grace);

    pid_t pid(int rank) const;
    bool running(int rank) const;  // started and not reaped (as of the last wait)
    int sentinel(int rank) const;  // readable once the child has exited

    // After fork in a child: drop every parent-side descriptor, never signal anyone.
    void abandon_after_fork() noexcept;

private:
    struct Watcher;
    struct Writer;
    struct Slot {
        pid_t pid = -1;
        Fd exit_fd;  // pidfd, or eventfd set by a watcher thread
        Fd result;   // read end, non-blocking
        Fd control;  // write end; kept open as the child's parent-alive sentinel
        Fd pending;  // result read end of a child that has not announced itself yet
        std::string output;
        bool reaped = false;
        int exitcode = 0;
    };

    Slot& slot(int rank);
    const Slot& slot(int rank) const;
    void attach(int rank, pid_t pid, Fd result);
    void reap(int rank);
    void drain_result(Slot& s, bool final);
    std::vector<ExitInfo> collect(bool all, std::size_t known, bool& done) const;
    void wake_others() noexcept;
    void send_input(int rank, std::vector<Chunk> input);

    std::vector<Slot> slots_;
    std::vector<ExitInfo> exits_;  // reap order
    Fd epoll_;
    Fd wake_;          // eventfd in the epoll set: "the log grew", for other blocked waiters
    int blocked_ = 0;  // threads inside epoll_wait on this group
    pid_t owner_;
    bool use_pidfd_;
    bool stopping_ = false;
    bool abandoned_ = false;
};

}  // namespace fastspawn
