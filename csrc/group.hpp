// Group: the N children of one call. It owns them: it watches them (one epoll set over
// pidfds and result pipes), stops them, reaps them, and destroying it ends them.
#pragma once

#include <csignal>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <sys/types.h>

#include "fd.hpp"
#include "launch.hpp"

namespace fastspawn {

// Seconds Group::stop waits for its children to die after SIGKILL before it hands the
// survivors to the engine's reaper. The one place of this bound.
constexpr double kKillWait = 5.0;

// What a child left behind: how it ended and every byte it wrote to its result pipe.
struct ExitInfo {
    int rank = -1;
    pid_t pid = -1;
    // multiprocessing convention: >= 0 exit status, < 0 killed by -signal. Empty when
    // the status is unknown: someone else reaped the child (SIGCHLD ignored, a
    // waitpid(-1) loop), or it was handed to the reaper still running (see stop()).
    std::optional<int> exitcode;
    std::string output;
};

// A child stop() could not see die within its bounds.
struct Unreaped {
    int rank = -1;
    pid_t pid = -1;
    std::string state;  // as /proc/PID/status says, e.g. "D (disk sleep)"
};

struct StopReport {
    std::vector<int> killed;          // ranks still alive when SIGKILL was sent
    std::vector<Unreaped> unreaped;   // handed to the reaper
};

// Whether `pid` is a child of this process that has not exited (never reaps it).
bool child_running(pid_t pid) noexcept;

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

    // A pending rank (open_channels) whose pid is known from elsewhere (the zygote's
    // reply): watched from now on whether or not it ever announces itself; its
    // announcement, when it comes, is still stripped from the output. Returns false,
    // and drops the rank (closes its pipes), when `pid` is not our child. True when the
    // rank is already watched under that pid.
    bool adopt_pid(int rank, pid_t pid);

    // A pending rank whose child was never made: close its pipes (no-op otherwise).
    void drop_pending(int rank) noexcept;

    // Exits are logged in the order they were reaped; every caller sees the same log.
    // Waits until the log holds more than `known` exits (or every child has exited, with
    // `all`), or `timeout` seconds pass (< 0: no limit), or one of the fds in `watch` is
    // readable or hung up. Returns the log from `known` on.
    // Any number of threads may wait at once: each reap wakes every waiter.
    std::vector<ExitInfo> wait(double timeout, bool all, std::size_t known,
                               const InterruptCheck& interrupted,
                               const std::vector<int>& watch = {});

    // Sends `sig` to `rank` through its pidfd (with `group`, also to its process group,
    // while the child is unreaped) unless it has ended. Returns whether it was sent.
    bool send_signal(int rank, int sig, bool group = false);

    // From now on, reaping a child first SIGKILLs what is left in its process group.
    void begin_stop() noexcept;

    // For the zygote's group: when one of its children is reaped and its process group
    // killed, children of *this process* still in that group that no group owns (forks of
    // the zygote killed before they announced themselves, left out of any reply) are
    // handed to the engine's reaper, so they never stay zombies.
    void set_reap_strays(bool on) noexcept;

    // The one stop: (1) begin_stop; (2) adopt pending ranks (at most
    // min(kill_wait, 1) s); (3) with grace > 0 and sig != 0, `sig` to every live child
    // (pidfd) and up to `grace` s for all to exit: `interrupted` returning true cuts
    // that wait short; (4) SIGKILL to every live child and its process group; (5) up to
    // `kill_wait` s for them to exit. Who is still there is handed to the reaper and
    // logged with an unknown exit code. Never waits longer than
    // min(kill_wait, 1) + grace + kill_wait; kill_wait must be finite and >= 0
    // (std::invalid_argument otherwise).
    StopReport stop(double grace, int sig = SIGTERM, double kill_wait = kKillWait,
                    const InterruptCheck& interrupted = nullptr);

    pid_t pid(int rank) const;
    bool running(int rank) const;  // started and not ended (as of the last wait)
    int sentinel(int rank) const;  // readable once the child has exited

    // After fork in a child: drop every parent-side descriptor, never signal anyone.
    void abandon_after_fork() noexcept;

private:
    struct Watcher;
    struct Writer;
    struct Slot {
        pid_t pid = -1;
        Fd pidfd;    // signals go here; the exit event too, in pidfd mode
        Fd event;    // thread mode: eventfd a watcher thread sets when the child exits
        Fd result;   // read end, non-blocking
        Fd control;  // write end; kept open as the child's parent-alive sentinel
        Fd pending;  // result read end of a child that has not announced itself yet
        std::string output;
        bool announcing = false;  // its 4-byte announcement is still to be stripped
        bool guarded = false;     // a foreign program the guardian watches
        bool gone = false;        // reaped by someone else: never signal its pid or group
        bool ended = false;       // reaped, reaped elsewhere, or handed to the reaper
        std::optional<int> exitcode;

        int exit_fd() const noexcept { return event ? event.get() : pidfd.get(); }
        // A pending rank given up (never started, not ours): its pipes closed.
        void drop_pending() noexcept {
            pending.reset();
            control.reset();
            output.clear();
        }
        bool live() const noexcept { return pid > 0 && !ended; }
    };

    Slot& slot(int rank);
    const Slot& slot(int rank) const;
    // The *_locked members run with the engine lock held.
    void attach_locked(int rank, pid_t pid, Fd result, bool announcing, bool guarded);
    bool signal_locked(Slot& s, int sig, bool group) noexcept;
    void reap_strays_locked(pid_t pgid) noexcept;
    void reap_locked(int rank);
    void hand_off_locked(int rank);
    void finish_locked(int rank, std::optional<int> exitcode);
    void drain_result(Slot& s, bool final);
    std::vector<ExitInfo> collect(bool all, std::size_t known, bool& done) const;
    void wake_others() noexcept;
    void send_input(int rank, std::vector<Chunk> input);
    bool any_pending() const;
    std::size_t logged() const;

    std::vector<Slot> slots_;
    std::vector<ExitInfo> exits_;  // reap order
    Fd epoll_;
    Fd wake_;          // eventfd in the epoll set: "the log grew", for other blocked waiters
    int blocked_ = 0;  // threads inside epoll_wait/poll on this group
    pid_t owner_;
    bool use_pidfd_;
    bool stopping_ = false;
    bool abandoned_ = false;
    bool reap_strays_ = false;
};

}  // namespace fastspawn
