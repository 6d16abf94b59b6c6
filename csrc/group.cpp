#include "group.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>

#include <poll.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <unistd.h>

namespace fastspawn {
namespace {

// One lock for all engine state. A fork (ours or anyone's, e.g. os.fork) takes it in
// the prepare handler, so a child never sees a group half-updated.
std::mutex& engine_mutex() {
    static std::mutex mu;
    return mu;
}

std::vector<Group*>& live_groups() {
    static std::vector<Group*> groups;
    return groups;
}

void atfork_prepare() { engine_mutex().lock(); }
void atfork_parent() { engine_mutex().unlock(); }
void atfork_child() {
    for (Group* g : live_groups()) g->abandon_after_fork();
    live_groups().clear();
    engine_mutex().unlock();
}

void register_atfork_once() {
    static std::once_flag once;
    std::call_once(once, [] { ::pthread_atfork(atfork_prepare, atfork_parent, atfork_child); });
}

constexpr std::uint64_t kWakeData = ~static_cast<std::uint64_t>(0);
constexpr std::uint64_t kExitTag = 0;
constexpr std::uint64_t kResultTag = 1;
constexpr std::size_t kDefaultPipeSize = 65536;
constexpr std::size_t kMaxPipeSize = 1 << 20;

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

}  // namespace

// Fallback when the kernel has no pidfd: a thread per child blocks in waitid(WNOWAIT)
// (it never reaps) and then makes an eventfd readable. Detached; owns its own fd.
struct Group::Watcher {
    static void start(pid_t pid, int efd) {
        Fd own(::fcntl(efd, F_DUPFD_CLOEXEC, 0));
        if (!own) throw_errno("fcntl(F_DUPFD_CLOEXEC)");
        std::thread([pid, fd = std::move(own)]() {
            sigset_t all;
            sigfillset(&all);
            ::pthread_sigmask(SIG_SETMASK, &all, nullptr);
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
            sigset_t all;
            sigfillset(&all);
            ::pthread_sigmask(SIG_SETMASK, &all, nullptr);  // EPIPE, never SIGPIPE
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
    if (!abandoned_ && ::getpid() == owner_) {
        try {
            stop(0.0);
        } catch (...) {
            // Destructors must not throw; whatever could not be reaped is left to init.
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

void Group::attach(int rank, pid_t pid, Fd result) {
    std::lock_guard<std::mutex> lock(engine_mutex());
    Slot& s = slot(rank);
    s.pid = pid;
    try {
        if (use_pidfd_) {
            s.exit_fd = open_pidfd(pid);
            if (!s.exit_fd) throw_errno("pidfd_open");
        } else {
            s.exit_fd = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
            if (!s.exit_fd) throw_errno("eventfd");
            Watcher::start(pid, s.exit_fd.get());
        }
        set_nonblocking(result.get(), true);
        epoll_add(epoll_.get(), s.exit_fd.get(), (static_cast<std::uint64_t>(rank) << 1) | kExitTag);
        epoll_add(epoll_.get(), result.get(), (static_cast<std::uint64_t>(rank) << 1) | kResultTag);
        s.result = std::move(result);
    } catch (...) {
        // Never leave a child we cannot watch: end it here.
        epoll_del(epoll_.get(), s.exit_fd.get());
        ::kill(-pid, SIGKILL);
        ::kill(pid, SIGKILL);
        siginfo_t info{};
        ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED);
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
    const pid_t pid = exec_child(plan);
    attach(rank, pid, std::move(result.read));
    {
        std::lock_guard<std::mutex> lock(engine_mutex());
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
    attach(rank, pid, std::move(result.read));
    std::lock_guard<std::mutex> lock(engine_mutex());
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
        for (std::size_t i = 0; i < pfds.size(); ++i) {
            if (!pfds[i].revents) continue;
            const int rank = ranks[i];
            pid_t pid = -1;
            {
                std::lock_guard<std::mutex> lock(engine_mutex());
                Slot& s = slot(rank);
                const bool eof = drain(s.pending.get(), s.output);
                if (s.output.size() >= sizeof(std::int32_t)) {
                    std::int32_t announced = 0;
                    std::memcpy(&announced, s.output.data(), sizeof announced);
                    s.output.erase(0, sizeof announced);
                    siginfo_t info{};
                    // Only our own children: waitid refuses anyone else (ECHILD).
                    if (announced > 0 && ::waitid(P_PID, static_cast<id_t>(announced), &info,
                                                  WEXITED | WNOHANG | WNOWAIT) == 0)
                        pid = announced;
                    else
                        s.pending.reset();
                } else if (eof) {
                    s.pending.reset();  // never started
                    s.output.clear();
                }
            }
            if (pid > 0) {
                Fd result;
                {
                    std::lock_guard<std::mutex> lock(engine_mutex());
                    result = std::move(slot(rank).pending);
                }
                attach(rank, pid, std::move(result));
                adopted.push_back(rank);
            }
        }
    }
}

void Group::drain_result(Slot& s, bool final) {
    if (!s.result) return;
    bool eof = drain(s.result.get(), s.output);
    if (eof || final) {
        epoll_del(epoll_.get(), s.result.get());
        s.result.reset();
    }
}

void Group::reap(int rank) {
    Slot& s = slot(rank);
    if (s.reaped || s.pid < 0) return;
    siginfo_t info{};
    if (::waitid(P_PID, static_cast<id_t>(s.pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 &&
        info.si_pid == 0)
        return;  // not exited yet
    // Exited (a zombie: its pid, and so its process group's id, is still ours). Take what
    // it wrote; when it failed or we are stopping, end what it left in its group.
    drain_result(s, true);
    if (stopping_ || decode_status(info) != 0) ::kill(-s.pid, SIGKILL);
    info = siginfo_t{};
    int rc;
    do {
        rc = ::waitid(P_PID, static_cast<id_t>(s.pid), &info, WEXITED);
    } while (rc != 0 && errno == EINTR);
    s.exitcode = rc == 0 ? decode_status(info) : 255;  // ECHILD: reaped behind our back
    s.reaped = true;
    epoll_del(epoll_.get(), s.exit_fd.get());
    exits_.push_back(ExitInfo{rank, s.pid, s.exitcode, std::move(s.output)});
    s.output.clear();
    wake_others();
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
        if (s.pid >= 0 && !s.reaped) any_running = true;
    done = all ? !any_running : (exits_.size() > known || !any_running);
    std::vector<ExitInfo> out;
    for (std::size_t i = known; i < exits_.size(); ++i) out.push_back(exits_[i]);
    return out;
}

std::vector<ExitInfo> Group::wait(double timeout, bool all, std::size_t known,
                                  const InterruptCheck& interrupted) {
    const Deadline deadline(timeout);
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
        const int n = ::epoll_wait(epoll_.get(), evs, 64, ms);
        const int err = errno;
        std::unique_lock<std::mutex> lock(engine_mutex());
        --blocked_;
        if (abandoned_) return {};
        if (n < 0) {
            if (err != EINTR) throw_errno("epoll_wait", err);
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
                reap(rank);
            else
                drain_result(s, false);
        }
        if (n == 0 && deadline.passed()) {
            bool done = false;
            return collect(false, known, done);  // time is up: whatever the log holds
        }
    }
}

bool Group::send_signal(int rank, int sig, bool group) {
    std::lock_guard<std::mutex> lock(engine_mutex());
    Slot& s = slot(rank);
    if (abandoned_ || s.pid < 0 || s.reaped) return false;
    // Not reaped, so the pid (and the process group it leads) cannot have been reused.
    if (group) ::kill(-s.pid, sig);
    return ::kill(s.pid, sig) == 0;
}

void Group::begin_stop() noexcept {
    std::lock_guard<std::mutex> lock(engine_mutex());
    stopping_ = true;
}

void Group::stop(double grace) {
    {
        std::lock_guard<std::mutex> lock(engine_mutex());
        if (abandoned_) return;
        stopping_ = true;
        for (auto& s : slots_)
            if (s.pid > 0 && !s.reaped) ::kill(s.pid, SIGTERM);
    }
    wait(grace, true, 0, nullptr);
    {
        std::lock_guard<std::mutex> lock(engine_mutex());
        for (auto& s : slots_) {
            if (s.pid > 0 && !s.reaped) {
                ::kill(-s.pid, SIGKILL);
                ::kill(s.pid, SIGKILL);
            }
        }
    }
    wait(-1, true, 0, nullptr);
}

pid_t Group::pid(int rank) const {
    std::lock_guard<std::mutex> lock(engine_mutex());
    return slot(rank).pid;
}

bool Group::running(int rank) const {
    std::lock_guard<std::mutex> lock(engine_mutex());
    const Slot& s = slot(rank);
    return s.pid > 0 && !s.reaped;
}

int Group::sentinel(int rank) const {
    std::lock_guard<std::mutex> lock(engine_mutex());
    return slot(rank).exit_fd.get();
}

void Group::abandon_after_fork() noexcept {
    // Runs in a fork child with the engine lock held: only close(), no allocation.
    abandoned_ = true;
    epoll_.reset();
    wake_.reset();
    for (auto& s : slots_) {
        s.exit_fd.reset();
        s.result.reset();
        s.control.reset();
        s.pending.reset();
    }
}

}  // namespace fastspawn
