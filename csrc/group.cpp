#include "group.hpp"
#include "guardian.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <utility>

#include <poll.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>


namespace fastspawn {
namespace {

// One lock for all engine state (groups and the reaper). A fork (ours or anyone's, e.g.
// os.fork) takes it in the prepare handler, so a child never sees it half-updated.
std::mutex& engine_mutex() {
    static std::mutex mu;
    return mu;
}

std::vector<Group*>& live_groups() {
    static std::vector<Group*> groups;
    return groups;
}

constexpr std::uint64_t kWakeData = ~static_cast<std::uint64_t>(0);
constexpr std::uint64_t kExitTag = 0;
constexpr std::uint64_t kResultTag = 1;
constexpr std::size_t kDefaultPipeSize = 65536;
constexpr std::size_t kMaxPipeSize = 1 << 20;
// Step 2 of stop(): how long pending ranks may take to announce themselves (at most).
constexpr double kStopAdoptWait = 1.0;

void block_all_signals() noexcept {
    sigset_t all;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, nullptr);
}

// A point in time `timeout` seconds from now (< 0 or infinite: never).
class Deadline {
public:
    explicit Deadline(double timeout)
        : forever_(timeout < 0 || std::isinf(timeout)),
          at_(forever_ ? Clock::time_point::max()
                       : Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                            std::chrono::duration<double>(timeout))) {}
    // Milliseconds left, rounded up (so a wait never ends early); -1 for never.
    int ms_left() const {
        if (forever_) return -1;
        const auto ms = std::chrono::ceil<std::chrono::milliseconds>(at_ - Clock::now()).count();
        return static_cast<int>(std::clamp<long long>(ms, 0, INT32_MAX));
    }
    bool passed() const { return !forever_ && Clock::now() >= at_; }

private:
    using Clock = std::chrono::steady_clock;
    bool forever_;
    Clock::time_point at_;
};

void epoll_add(int ep, int fd, std::uint64_t data) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = data;
    if (::epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) throw_errno("epoll_ctl(ADD)");
}

void epoll_del(int ep, int fd) noexcept {
    if (ep >= 0 && fd >= 0) ::epoll_ctl(ep, EPOLL_CTL_DEL, fd, nullptr);
}

int decode_status(const siginfo_t& info) {
    switch (info.si_code) {
        case CLD_EXITED:
            return info.si_status;
        case CLD_KILLED:
        case CLD_DUMPED:
            return -info.si_status;
        default:
            return 255;
    }
}

// waitid(P_PID, pid, WEXITED | WNOHANG | extra), retried on EINTR. 0 and info.si_pid == 0:
// our child, still running; 0 and si_pid == pid: it exited; -1 (ECHILD): not our child,
// or reaped by someone else already.
int waitid_nohang(pid_t pid, siginfo_t& info, int extra) noexcept {
    int rc;
    do {
        info = siginfo_t{};
        rc = ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | extra);
    } while (rc != 0 && errno == EINTR);
    return rc;
}

// Our child and not reaped (running or a zombie): its pid, and the process group that
// carries that id, cannot belong to anyone else.
bool unreaped_child(pid_t pid) noexcept {
    siginfo_t info;
    return waitid_nohang(pid, info, WNOWAIT) == 0;
}

int pidfd_signal(int pidfd, int sig) noexcept {
#ifdef SYS_pidfd_send_signal
    return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0u));
#else
    (void)pidfd;
    (void)sig;
    errno = ENOSYS;
    return -1;
#endif
}

// Whether a pid that announced itself on one of our pipes may be watched: our child, or
// gone already (reaped by someone else: its exit is then logged as unknown).
bool ours_or_gone(pid_t pid) noexcept {
    if (pid <= 0) return false;
    if (unreaped_child(pid)) return true;
    if (errno != ECHILD) return false;
    const Fd probe = open_pidfd(pid);
    return !probe && errno == ESRCH;
}

// "D (disk sleep)": the State line of /proc/PID/status.
std::string proc_state(pid_t pid) {
    std::ifstream status("/proc/" + std::to_string(pid) + "/status");
    std::string line;
    while (std::getline(status, line)) {
        if (line.compare(0, 6, "State:") != 0) continue;
        const auto begin = line.find_first_not_of(" \t", 6);
        return begin == std::string::npos ? std::string("?") : line.substr(begin);
    }
    return "? (unknown)";
}

// The engine's reaper: children a group gave up waiting for (stop's bound passed, or the
// group was destroyed) are reaped here when they finally exit, by one background thread
// (started on first use) over an epoll set of their pidfds. Nothing waits for it: it
// lives as long as the process and never delays exit. Its state is guarded by the
// engine lock.
class Reaper {
public:
    // Takes `pid` (our child, already SIGKILLed); `pidfd` may be empty. Engine lock held.
    static void take_locked(pid_t pid, Fd pidfd, bool guarded) noexcept;
    // In a fork child (engine lock held): forget everything, only close().
    static void reset_after_fork() noexcept;

private:
    struct Entry {
        pid_t pid;
        Fd pidfd;
        bool guarded;
    };
    static std::shared_ptr<Reaper>& instance();
    static void reap_now(pid_t pid, bool guarded) noexcept;
    static void watch_with_thread(pid_t pid, bool guarded) noexcept;
    bool start_locked() noexcept;
    void run() noexcept;
    void reap_locked(pid_t pid) noexcept;

    Fd epoll_;
    std::vector<Entry> entries_;
    bool running_ = false;
};

// Set once the reaper exists: the fork child handler must not create it (no allocation).
Reaper* g_reaper = nullptr;

std::shared_ptr<Reaper>& Reaper::instance() {
    // The thread holds a reference too, so the reaper outlives static destruction.
    static std::shared_ptr<Reaper> self = [] {
        auto r = std::make_shared<Reaper>();
        g_reaper = r.get();
        return r;
    }();
    return self;
}

// Ends an exited child of ours: what is left in its process group gets SIGKILL (the
// zombie still holds the group's id), the guardian forgets it, then it is reaped.
void Reaper::reap_now(pid_t pid, bool guarded) noexcept {
    siginfo_t info;
    const int rc = waitid_nohang(pid, info, WNOWAIT);
    if (rc == 0 && info.si_pid == 0) return;  // still running
    if (rc == 0) ::kill(-pid, SIGKILL);
    if (guarded) guardian_forget(pid);
    if (rc == 0) waitid_nohang(pid, info, 0);
}

// No pidfd: a detached thread blocks until the child exits, then reaps it.
void Reaper::watch_with_thread(pid_t pid, bool guarded) noexcept {
    try {
        std::thread([pid, guarded] {
            block_all_signals();
            siginfo_t info{};
            while (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOWAIT) != 0 &&
                   errno == EINTR) {
            }
            reap_now(pid, guarded);
        }).detach();
    } catch (...) {
        // No thread either: the zombie stays until this process exits.
    }
}

void Reaper::take_locked(pid_t pid, Fd pidfd, bool guarded) noexcept {
    try {
        if (!pidfd) pidfd = open_pidfd(pid);
        if (!pidfd) {
            if (errno == ESRCH) {  // reaped by someone else already
                if (guarded) guardian_forget(pid);
                return;
            }
            watch_with_thread(pid, guarded);
            return;
        }
        Reaper& r = *instance();
        if (!r.start_locked()) {
            watch_with_thread(pid, guarded);
            return;
        }
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = static_cast<std::uint64_t>(pid);
        r.entries_.push_back(Entry{pid, std::move(pidfd), guarded});
        if (::epoll_ctl(r.epoll_.get(), EPOLL_CTL_ADD, r.entries_.back().pidfd.get(), &ev) != 0) {
            r.entries_.pop_back();
            watch_with_thread(pid, guarded);
        }
    } catch (...) {
        watch_with_thread(pid, guarded);
    }
}

bool Reaper::start_locked() noexcept {
    if (running_) return true;
    try {
        if (!epoll_) epoll_ = Fd(::epoll_create1(EPOLL_CLOEXEC));
        if (!epoll_) return false;
        std::thread([self = instance()] { self->run(); }).detach();
        running_ = true;
    } catch (...) {
        return false;
    }
    return true;
}

void Reaper::run() noexcept {
    block_all_signals();
    const int ep = epoll_.get();  // never closed in this process (only in a fork child)
    for (;;) {
        epoll_event evs[16];
        const int n = ::epoll_wait(ep, evs, 16, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            return;
        }
        std::lock_guard<std::mutex> lock(engine_mutex());
        for (int i = 0; i < n; ++i) reap_locked(static_cast<pid_t>(evs[i].data.u64));
    }
}

void Reaper::reap_locked(pid_t pid) noexcept {
    auto it = std::find_if(entries_.begin(), entries_.end(), [pid](const Entry& e) { return e.pid == pid; });
    if (it == entries_.end()) return;
    siginfo_t info;
    if (waitid_nohang(pid, info, WNOWAIT) == 0 && info.si_pid == 0) return;  // not yet
    reap_now(pid, it->guarded);
    epoll_del(epoll_.get(), it->pidfd.get());
    entries_.erase(it);
}

void Reaper::reset_after_fork() noexcept {
    if (!g_reaper) return;
    g_reaper->epoll_.reset();
    g_reaper->entries_.clear();  // closes the pidfds; keeps the capacity (no free)
    g_reaper->running_ = false;  // the thread was not copied into this process
}

void atfork_prepare() { engine_mutex().lock(); }
void atfork_parent() { engine_mutex().unlock(); }
void atfork_child() {
    for (Group* g : live_groups()) g->abandon_after_fork();
    live_groups().clear();
    Reaper::reset_after_fork();
    engine_mutex().unlock();
}

void register_atfork_once() {
    static std::once_flag once;
    std::call_once(once, [] { ::pthread_atfork(atfork_prepare, atfork_parent, atfork_child); });
}

}  // namespace

bool child_running(pid_t pid) noexcept {
    siginfo_t info;
    return pid > 0 && waitid_nohang(pid, info, WNOWAIT) == 0 && info.si_pid == 0;
}

// Fallback when the kernel has no pidfd: a thread per child blocks in waitid(WNOWAIT)
// (it never reaps) and then makes an eventfd readable. Detached; owns its own fd.
struct Group::Watcher {
    static void start(pid_t pid, int efd) {
        Fd own(::fcntl(efd, F_DUPFD_CLOEXEC, 0));
        if (!own) throw_errno("fcntl(F_DUPFD_CLOEXEC)");
        std::thread([pid, fd = std::move(own)]() {
            block_all_signals();
            siginfo_t info{};
            while (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOWAIT) != 0 &&
                   errno == EINTR) {
            }
            const std::uint64_t one = 1;
            while (::write(fd.get(), &one, sizeof one) < 0 && errno == EINTR) {
            }
        }).detach();
    }
};

// Sends what did not fit in the control pipes without blocking. Detached; owns dups of
// the pipes, so the group may go away first (the write then fails with EPIPE).
struct Group::Writer {
    struct Job {
        Fd fd;
        std::vector<Chunk> chunks;
        std::size_t chunk = 0;
        std::size_t offset = 0;
    };
    static void start(std::vector<Job> jobs) {
        std::thread([jobs = std::move(jobs)]() mutable {
            block_all_signals();  // EPIPE, never SIGPIPE
            for (;;) {
                std::vector<pollfd> pfds;
                std::vector<Job*> owners;
                for (auto& j : jobs) {
                    if (j.fd && j.chunk < j.chunks.size()) {
                        pfds.push_back(pollfd{j.fd.get(), POLLOUT, 0});
                        owners.push_back(&j);
                    }
                }
                if (pfds.empty()) return;
                if (::poll(pfds.data(), pfds.size(), -1) < 0) {
                    if (errno == EINTR) continue;
                    return;
                }
                for (std::size_t i = 0; i < pfds.size(); ++i) {
                    if (!pfds[i].revents) continue;
                    Job& j = *owners[i];
                    try {
                        while (j.chunk < j.chunks.size()) {
                            const std::string& c = *j.chunks[j.chunk];
                            long n = write_some(j.fd.get(), c.data() + j.offset, c.size() - j.offset);
                            if (n < 0) {  // reader gone
                                j.fd.reset();
                                break;
                            }
                            j.offset += static_cast<std::size_t>(n);
                            if (j.offset < c.size()) break;
                            ++j.chunk;
                            j.offset = 0;
                        }
                    } catch (const std::exception&) {
                        j.fd.reset();
                    }
                }
            }
        }).detach();
    }
};

Group::Group(int nprocs, bool use_pidfd)
    : slots_(static_cast<std::size_t>(std::max(nprocs, 0))),
      owner_(::getpid()),
      use_pidfd_(use_pidfd && pidfd_supported()) {
    register_atfork_once();
    epoll_ = Fd(::epoll_create1(EPOLL_CLOEXEC));
    if (!epoll_) throw_errno("epoll_create1");
    wake_ = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!wake_) throw_errno("eventfd");
    epoll_add(epoll_.get(), wake_.get(), kWakeData);
    std::lock_guard<std::mutex> lock(engine_mutex());
    live_groups().push_back(this);
}

Group::~Group() {
    // Never blocks: what still runs gets SIGKILL and goes to the reaper.
    if (!abandoned_ && ::getpid() == owner_) {
        try {
            adopt(0.0, nullptr);  // those that announced themselves already
        } catch (...) {
        }
        std::lock_guard<std::mutex> lock(engine_mutex());
        stopping_ = true;
        for (int r = 0; r < size(); ++r) {
            try {
                reap_locked(r);
                Slot& s = slots_[static_cast<std::size_t>(r)];
                if (!s.live()) continue;
                signal_locked(s, SIGKILL, true);
                hand_off_locked(r);
            } catch (...) {
                // Destructors must not throw; the reaper took it or init will.
            }
        }
    }
    std::lock_guard<std::mutex> lock(engine_mutex());
    auto& gs = live_groups();
    gs.erase(std::remove(gs.begin(), gs.end(), this), gs.end());
}

Group::Slot& Group::slot(int rank) {
    if (rank < 0 || rank >= size()) throw std::out_of_range("rank out of range");
    return slots_[static_cast<std::size_t>(rank)];
}

const Group::Slot& Group::slot(int rank) const {
    if (rank < 0 || rank >= size()) throw std::out_of_range("rank out of range");
    return slots_[static_cast<std::size_t>(rank)];
}

void Group::attach_locked(int rank, pid_t pid, Fd result, bool announcing, bool guarded) {
    Slot& s = slot(rank);
    s.pid = pid;
    s.announcing = announcing;
    s.guarded = guarded;
    Fd pidfd = open_pidfd(pid);
    const int pidfd_err = errno;
    if (!pidfd && pidfd_err == ESRCH) {
        // Reaped by someone else already (SIGCHLD ignored, a waitpid(-1) loop): not a
        // reason to signal anything; log what it wrote, exit status unknown.
        s.gone = true;
        if (result) {
            set_nonblocking(result.get(), true);
            s.result = std::move(result);
            drain_result(s, true);
        }
        if (guarded) guardian_forget(pid);
        finish_locked(rank, std::nullopt);
        return;
    }
    try {
        s.pidfd = std::move(pidfd);
        if (use_pidfd_) {
            if (!s.pidfd) throw_errno("pidfd_open", pidfd_err);
        } else {
            s.event = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
            if (!s.event) throw_errno("eventfd");
            Watcher::start(pid, s.event.get());
        }
        set_nonblocking(result.get(), true);
        epoll_add(epoll_.get(), s.exit_fd(), (static_cast<std::uint64_t>(rank) << 1) | kExitTag);
        epoll_add(epoll_.get(), result.get(), (static_cast<std::uint64_t>(rank) << 1) | kResultTag);
        s.result = std::move(result);
    } catch (...) {
        // Never leave a child we cannot watch: SIGKILL it and let the reaper have it.
        epoll_del(epoll_.get(), s.exit_fd());
        signal_locked(s, SIGKILL, true);
        Reaper::take_locked(pid, std::move(s.pidfd), guarded);
        s = Slot{};
        throw;
    }
}

void Group::start_exec(int rank, const std::string& exe, const std::vector<std::string>& argv,
                       const std::vector<int>& pass_fds, std::vector<Chunk> input,
                       const ExecOptions& options) {
    if (slot(rank).pid != -1) throw std::logic_error("rank already started");
    Pipe control = make_pipe();
    Pipe result = make_pipe();
    ExecPlan plan;
    plan.exe = exe;
    plan.argv = argv;
    plan.keep_fds = pass_fds;
    if (options.protocol) {
        plan.argv.push_back(std::to_string(control.read.get()));
        plan.argv.push_back(std::to_string(result.write.get()));
        plan.argv.push_back(std::to_string(owner_));
        plan.keep_fds.push_back(control.read.get());
        plan.keep_fds.push_back(result.write.get());
    }
    plan.owner = owner_;
    plan.replace_env = options.replace_env;
    plan.env = options.env;
    plan.redirects = options.redirects;
    plan.death_signal = options.death_signal;
    plan.program = !options.protocol;  // SIGKILL as parent-death signal, and the guardian
    const pid_t pid = exec_child(plan);  // a program: the guardian watches it from here on
    const bool guarded = plan.program;       // so whoever reaps it calls guardian_forget first
    {
        std::lock_guard<std::mutex> lock(engine_mutex());
        attach_locked(rank, pid, std::move(result.read), false, guarded);
        slot(rank).control = std::move(control.write);
    }
    send_input(rank, std::move(input));
}

void Group::send_input(int rank, std::vector<Chunk> input) {
    std::size_t total = 0;
    for (const auto& c : input) total += c->size();
    if (total == 0) return;
    std::lock_guard<std::mutex> lock(engine_mutex());
    Slot& s = slot(rank);
    const int fd = s.control.get();
    if (total > kDefaultPipeSize)  // best effort: most payloads then go in one write
        ::fcntl(fd, F_SETPIPE_SZ, static_cast<int>(std::min(total, kMaxPipeSize)));
    set_nonblocking(fd, true);
    std::size_t chunk = 0;
    std::size_t offset = 0;
    while (chunk < input.size()) {
        const std::string& c = *input[chunk];
        long n = write_some(fd, c.data() + offset, c.size() - offset);
        if (n < 0) return;  // the child is already gone; its exit will tell why
        offset += static_cast<std::size_t>(n);
        if (offset < c.size()) break;
        ++chunk;
        offset = 0;
    }
    if (chunk == input.size()) return;
    Writer::Job job;
    job.fd = Fd(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
    if (!job.fd) throw_errno("fcntl(F_DUPFD_CLOEXEC)");
    job.chunks = std::move(input);
    job.chunk = chunk;
    job.offset = offset;
    std::vector<Writer::Job> jobs;
    jobs.push_back(std::move(job));
    Writer::start(std::move(jobs));
}

pid_t Group::start_fork(int rank, int& control_fd, int& result_fd) {
    if (slot(rank).pid != -1) throw std::logic_error("rank already started");
    Pipe control = make_pipe();
    Pipe result = make_pipe();
    const pid_t pid = fork_child(owner_);
    if (pid == 0) {
        control_fd = control.read.release();
        result_fd = result.write.release();
        return 0;
    }
    std::lock_guard<std::mutex> lock(engine_mutex());
    attach_locked(rank, pid, std::move(result.read), false, false);
    slot(rank).control = std::move(control.write);
    return pid;
}

std::pair<int, int> Group::open_channels(int rank) {
    std::lock_guard<std::mutex> lock(engine_mutex());
    Slot& s = slot(rank);
    if (s.pid != -1 || s.pending) throw std::logic_error("rank already started");
    Pipe control = make_pipe();
    Pipe result = make_pipe();
    set_nonblocking(result.read.get(), true);
    s.control = std::move(control.write);
    s.pending = std::move(result.read);
    return {control.read.release(), result.write.release()};
}

std::vector<int> Group::adopt(double timeout, const InterruptCheck& interrupted) {
    const Deadline deadline(timeout);
    std::vector<int> adopted;
    for (;;) {
        std::vector<pollfd> pfds;
        std::vector<int> ranks;
        {
            std::lock_guard<std::mutex> lock(engine_mutex());
            for (int r = 0; r < size(); ++r) {
                Slot& s = slots_[static_cast<std::size_t>(r)];
                if (!s.pending) continue;
                pfds.push_back(pollfd{s.pending.get(), POLLIN, 0});
                ranks.push_back(r);
            }
        }
        if (pfds.empty()) return adopted;
        const int ms = deadline.ms_left();
        const int n = ::poll(pfds.data(), pfds.size(), ms);
        if (n < 0) {
            if (errno != EINTR) throw_errno("poll");
            if (interrupted && interrupted()) return adopted;
            continue;
        }
        if (n == 0) return adopted;  // time is up: the rest stay pending
        std::lock_guard<std::mutex> lock(engine_mutex());
        for (std::size_t i = 0; i < pfds.size(); ++i) {
            if (!pfds[i].revents) continue;
            const int rank = ranks[i];
            Slot& s = slot(rank);
            if (!s.pending || s.pid != -1) continue;  // adopt_pid took it meanwhile
            const bool eof = drain(s.pending.get(), s.output);
            if (s.output.size() >= sizeof(std::int32_t)) {
                std::int32_t announced = 0;
                std::memcpy(&announced, s.output.data(), sizeof announced);
                s.output.erase(0, sizeof announced);
                // Only our own children (or ones already reaped elsewhere).
                if (ours_or_gone(announced)) {
                    attach_locked(rank, announced, std::move(s.pending), false, false);
                    adopted.push_back(rank);
                } else {
                    s.drop_pending();
                }
            } else if (eof) {
                s.drop_pending();  // never started
            }
        }
    }
}

bool Group::adopt_pid(int rank, pid_t pid) {
    std::lock_guard<std::mutex> lock(engine_mutex());
    Slot& s = slot(rank);
    if (s.pid != -1) return s.pid == pid;  // adopted already (its announcement came first)
    if (!s.pending) return false;           // dropped, or no channels opened
    if (!ours_or_gone(pid)) {
        s.drop_pending();
        return false;
    }
    attach_locked(rank, pid, std::move(s.pending), true, false);
    return true;
}

void Group::drop_pending(int rank) noexcept {
    std::lock_guard<std::mutex> lock(engine_mutex());
    if (rank < 0 || rank >= size()) return;
    Slot& s = slots_[static_cast<std::size_t>(rank)];
    if (s.pid == -1) s.drop_pending();
}

bool Group::any_pending() const {
    std::lock_guard<std::mutex> lock(engine_mutex());
    for (const auto& s : slots_)
        if (s.pending && s.pid == -1) return true;
    return false;
}

std::size_t Group::logged() const {
    std::lock_guard<std::mutex> lock(engine_mutex());
    return exits_.size();
}

void Group::drain_result(Slot& s, bool final) {
    if (!s.result) return;
    bool eof = drain(s.result.get(), s.output);
    if (s.announcing && s.output.size() >= sizeof(std::int32_t)) {
        // Adopted by pid before it announced itself: its announcement is no output.
        std::int32_t announced = 0;
        std::memcpy(&announced, s.output.data(), sizeof announced);
        if (announced == s.pid) s.output.erase(0, sizeof announced);
        s.announcing = false;
    }
    if (eof || final) {
        epoll_del(epoll_.get(), s.result.get());
        s.result.reset();
    }
}

void Group::finish_locked(int rank, std::optional<int> exitcode) {
    Slot& s = slot(rank);
    s.ended = true;
    s.exitcode = exitcode;
    epoll_del(epoll_.get(), s.exit_fd());
    exits_.push_back(ExitInfo{rank, s.pid, exitcode, std::move(s.output)});
    s.output.clear();
    wake_others();
}

void Group::reap_locked(int rank) {
    Slot& s = slot(rank);
    if (!s.live()) return;
    siginfo_t info;
    const int rc = waitid_nohang(s.pid, info, WNOWAIT);
    if (rc == 0 && info.si_pid == 0) return;  // not exited yet
    drain_result(s, true);
    if (rc != 0) {
        // ECHILD: someone else reaped it. Its pid and group id may be anyone's now.
        s.gone = true;
        if (s.guarded) guardian_forget(s.pid);
        finish_locked(rank, std::nullopt);
        return;
    }
    // Exited, a zombie: its pid, and so its process group's id, is still ours. When it
    // failed or we are stopping, end what it left in its group.
    const int code = decode_status(info);
    if (stopping_ || code != 0) {
        ::kill(-s.pid, SIGKILL);
        if (reap_strays_) reap_strays_locked(s.pid);
    }
    if (s.guarded) guardian_forget(s.pid);
    std::optional<int> exitcode;
    if (waitid_nohang(s.pid, info, 0) == 0 && info.si_pid == s.pid)
        exitcode = decode_status(info);
    else
        s.gone = true;  // reaped behind our back just now: status unknown
    finish_locked(rank, exitcode);
}

// Children of this process in process group `pgid` (its leader an unreaped zombie of
// ours, so the id is not a stranger's) that no live group owns: already SIGKILLed with
// the group, they go to the reaper. Found through /proc (ppid and pgrp of each process);
// runs only for groups that asked for it (the zygote's), on its reap.
void Group::reap_strays_locked(pid_t pgid) noexcept {
    const pid_t self = ::getpid();
    DIR* dir = ::opendir("/proc");
    if (dir == nullptr) return;
    std::vector<pid_t> strays;
    try {
        while (const dirent* entry = ::readdir(dir)) {
            char* end = nullptr;
            const long pid = std::strtol(entry->d_name, &end, 10);
            if (pid <= 0 || *end != '\0' || pid == pgid) continue;
            char path[64];
            std::snprintf(path, sizeof path, "/proc/%ld/stat", pid);
            const Fd fd(::open(path, O_RDONLY | O_CLOEXEC));
            if (!fd) continue;
            char buf[512];
            const ssize_t n = ::read(fd.get(), buf, sizeof buf - 1);
            if (n <= 0) continue;
            buf[n] = '\0';
            const char* close = std::strrchr(buf, ')');  // the name may hold anything
            int ppid = 0;
            int pgrp = 0;
            char state = 0;
            if (close == nullptr || std::sscanf(close + 1, " %c %d %d", &state, &ppid, &pgrp) != 3) continue;
            if (ppid == self && pgrp == pgid) strays.push_back(static_cast<pid_t>(pid));
        }
    } catch (...) {
    }
    ::closedir(dir);
    for (const pid_t pid : strays) {
        bool owned = false;
        for (const Group* g : live_groups())
            for (const auto& other : g->slots_)
                if (other.pid == pid && other.live()) owned = true;
        if (!owned && unreaped_child(pid)) Reaper::take_locked(pid, Fd(), false);
    }
}

void Group::hand_off_locked(int rank) {
    Slot& s = slot(rank);
    drain_result(s, true);
    Fd pidfd;
    if (s.pidfd && !s.gone) pidfd = Fd(::fcntl(s.pidfd.get(), F_DUPFD_CLOEXEC, 0));
    // The slot keeps its own pidfd (sentinel() handed out its number); the reaper owns a dup.
    if (!s.gone) Reaper::take_locked(s.pid, std::move(pidfd), s.guarded);
    finish_locked(rank, std::nullopt);
}

bool Group::signal_locked(Slot& s, int sig, bool group) noexcept {
    if (abandoned_ || !s.live() || s.gone) return false;
    if (!unreaped_child(s.pid)) {
        // Reaped by someone else (we reap only under this lock): never signal it again.
        if (errno == ECHILD) s.gone = true;
        return false;
    }
    // Unreaped, so the process group with its id is its own.
    if (group) ::kill(-s.pid, sig);
    if (s.pidfd) return pidfd_signal(s.pidfd.get(), sig) == 0;
    return ::kill(s.pid, sig) == 0;
}

void Group::wake_others() noexcept {
    // epoll wakes one blocked waiter per event; each woken waiter passes it on.
    if (blocked_ > 0) {
        const std::uint64_t one = 1;
        (void)!::write(wake_.get(), &one, sizeof one);
    }
}

std::vector<ExitInfo> Group::collect(bool all, std::size_t known, bool& done) const {
    bool any_running = false;
    for (const auto& s : slots_)
        if (s.live()) any_running = true;
    done = all ? !any_running : (exits_.size() > known || !any_running);
    std::vector<ExitInfo> out;
    for (std::size_t i = known; i < exits_.size(); ++i) out.push_back(exits_[i]);
    return out;
}

std::vector<ExitInfo> Group::wait(double timeout, bool all, std::size_t known,
                                  const InterruptCheck& interrupted, const std::vector<int>& watch) {
    const Deadline deadline(timeout);
    std::vector<pollfd> pfds;
    if (!watch.empty()) {
        pfds.push_back(pollfd{epoll_.get(), POLLIN, 0});
        for (int fd : watch) pfds.push_back(pollfd{fd, POLLIN, 0});
    }
    for (;;) {
        {
            std::lock_guard<std::mutex> lock(engine_mutex());
            if (abandoned_) return {};
            bool done = false;
            auto out = collect(all, known, done);
            if (done) return out;
            ++blocked_;
        }
        const int ms = deadline.ms_left();
        epoll_event evs[64];
        int n;
        int err = 0;
        bool watched = false;  // a watched fd is readable or hung up
        if (pfds.empty()) {
            n = ::epoll_wait(epoll_.get(), evs, 64, ms);
            err = errno;
        } else {
            // poll() over the epoll fd (readable when it has events) and the watched fds.
            for (auto& p : pfds) p.revents = 0;
            n = ::poll(pfds.data(), pfds.size(), ms);
            err = errno;
            if (n > 0) {
                for (std::size_t i = 1; i < pfds.size(); ++i) {
                    if (pfds[i].revents & POLLNVAL) err = EBADF;
                    if (pfds[i].revents) watched = true;
                }
                n = pfds[0].revents ? ::epoll_wait(epoll_.get(), evs, 64, 0) : 0;
                if (n < 0) n = 0;
            }
        }
        std::unique_lock<std::mutex> lock(engine_mutex());
        --blocked_;
        if (abandoned_) return {};
        if (err == EBADF && watched) throw_errno("poll(watch)", EBADF);
        if (n < 0) {
            if (err != EINTR) throw_errno(pfds.empty() ? "epoll_wait" : "poll", err);
            lock.unlock();
            if (interrupted && interrupted()) return {};
            continue;
        }
        for (int i = 0; i < n; ++i) {
            const std::uint64_t data = evs[i].data.u64;
            if (data == kWakeData) {
                std::uint64_t count = 0;
                (void)!::read(wake_.get(), &count, sizeof count);
                wake_others();  // pass it on to whoever else is blocked
                continue;
            }
            const int rank = static_cast<int>(data >> 1);
            Slot& s = slots_[static_cast<std::size_t>(rank)];
            if ((data & 1) == kExitTag)
                reap_locked(rank);
            else
                drain_result(s, false);
        }
        if (watched || (n == 0 && deadline.passed())) {
            bool done = false;
            return collect(false, known, done);  // whatever the log holds
        }
    }
}

bool Group::send_signal(int rank, int sig, bool group) {
    std::lock_guard<std::mutex> lock(engine_mutex());
    return signal_locked(slot(rank), sig, group);
}

void Group::begin_stop() noexcept {
    std::lock_guard<std::mutex> lock(engine_mutex());
    stopping_ = true;
}

void Group::set_reap_strays(bool on) noexcept {
    std::lock_guard<std::mutex> lock(engine_mutex());
    reap_strays_ = on;
}

StopReport Group::stop(double grace, int sig, double kill_wait, const InterruptCheck& interrupted) {
    StopReport report;
    // The kill wait is what keeps stop bounded: never "forever".
    if (!(kill_wait >= 0.0) || std::isinf(kill_wait))
        throw std::invalid_argument("kill_wait must be a finite number of seconds >= 0");
    if (std::isnan(grace)) throw std::invalid_argument("grace must be a number");
    // 1. From now on a reaped child's process group gets SIGKILL.
    {
        std::lock_guard<std::mutex> lock(engine_mutex());
        if (abandoned_) return report;
        stopping_ = true;
    }
    // 2. Children forked elsewhere and not adopted yet (adopt_pid ones are watched). A
    // failure here (one child we could not watch: already killed) must not spare the rest.
    std::exception_ptr failure;
    try {
        if (any_pending()) adopt(std::min(kill_wait, kStopAdoptWait), nullptr);
    } catch (const std::exception&) {
        failure = std::current_exception();
    }
    // 3. The polite signal, and the grace; an interruption cuts the grace short.
    if (grace > 0 && sig != 0) {
        bool any = false;
        {
            std::lock_guard<std::mutex> lock(engine_mutex());
            for (auto& s : slots_)
                if (signal_locked(s, sig, false)) any = true;
        }
        if (any) wait(grace, true, logged(), interrupted);
    }
    // 4. SIGKILL to what still runs (reap what exited first: a zombie needs no kill).
    wait(0.0, true, logged(), nullptr);
    bool any_live = false;
    {
        std::lock_guard<std::mutex> lock(engine_mutex());
        for (int r = 0; r < size(); ++r) {
            Slot& s = slots_[static_cast<std::size_t>(r)];
            if (!s.live()) continue;
            any_live = true;
            signal_locked(s, SIGKILL, true);
            if (!s.gone) report.killed.push_back(r);  // gone: reaped elsewhere, exit pending
        }
    }
    if (!any_live) {
        if (failure) std::rethrow_exception(failure);
        return report;
    }
    // 5. A bounded wait; who is still there goes to the reaper.
    wait(kill_wait, true, logged(), nullptr);
    std::lock_guard<std::mutex> lock(engine_mutex());
    for (int r = 0; r < size(); ++r) {
        Slot& s = slots_[static_cast<std::size_t>(r)];
        if (!s.live()) continue;
        report.unreaped.push_back(Unreaped{r, s.pid, proc_state(s.pid)});
        hand_off_locked(r);
    }
    if (failure) std::rethrow_exception(failure);
    return report;
}

pid_t Group::pid(int rank) const {
    std::lock_guard<std::mutex> lock(engine_mutex());
    return slot(rank).pid;
}

bool Group::running(int rank) const {
    std::lock_guard<std::mutex> lock(engine_mutex());
    return slot(rank).live();
}

int Group::sentinel(int rank) const {
    std::lock_guard<std::mutex> lock(engine_mutex());
    return slot(rank).exit_fd();
}

void Group::abandon_after_fork() noexcept {
    // Runs in a fork child with the engine lock held: only close(), no allocation.
    abandoned_ = true;
    epoll_.reset();
    wake_.reset();
    for (auto& s : slots_) {
        s.pidfd.reset();
        s.event.reset();
        s.result.reset();
        s.control.reset();
        s.pending.reset();
    }
}

}  // namespace fastspawn
