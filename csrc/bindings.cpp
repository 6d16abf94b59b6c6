// fastspawn._core: the only file that knows about Python. It converts bytes and ints,
// releases the GIL around every wait, and turns std::system_error into OSError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <tuple>
#include <vector>

#include "group.hpp"
#include "guardian.hpp"
#include "launch.hpp"

namespace py = pybind11;
using fastspawn::Chunk;
using fastspawn::ExitInfo;
using fastspawn::Group;
using ChildSpecFds = std::tuple<int, std::vector<std::pair<int, int>>, std::vector<int>>;

namespace {

// Shared, immutable bytes handed to the engine once and sent to many children.
struct PyChunk {
    Chunk data;
};

// On EINTR inside a wait: run Python's signal handlers. A raised exception (e.g.
// KeyboardInterrupt) ends the wait and is re-raised once the GIL is back; handlers do
// not run again meanwhile (the exception stays pending).
struct SignalCheck {
    bool raised = false;
    bool operator()() {
        if (raised) return true;
        py::gil_scoped_acquire gil;
        if (PyErr_CheckSignals() != 0) {
            raised = true;
            return true;
        }
        return false;
    }
};

py::list to_python(std::vector<ExitInfo>&& exits) {
    py::list out;
    for (auto& e : exits)
        out.append(py::make_tuple(e.rank, e.pid, e.exitcode,
                                  py::bytes(e.output)));
    return out;
}

double to_timeout(const py::object& timeout) {
    if (timeout.is_none()) return -1.0;
    return timeout.cast<double>();
}

// Forks through `fork` (returns a pid; 0 in the child) with Python's own before/after
// hooks around it, as os.fork does.
template <typename Fork>
pid_t python_fork(Fork&& fork) {
    PyOS_BeforeFork();
    pid_t pid;
    try {
        pid = fork();
    } catch (...) {
        PyOS_AfterFork_Parent();
        throw;
    }
    if (pid == 0)
        PyOS_AfterFork_Child();
    else
        PyOS_AfterFork_Parent();
    return pid;
}

template <typename Fn>
py::list interruptible(Fn&& fn) {
    SignalCheck check;
    std::vector<ExitInfo> exits;
    {
        py::gil_scoped_release nogil;
        exits = fn([&check] { return check(); });
    }
    if (check.raised) throw py::error_already_set();
    return to_python(std::move(exits));
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "fastspawn's native process engine (internal; use the fastspawn package).";

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const std::system_error& e) {
            py::object err = py::reinterpret_steal<py::object>(
                PyObject_CallFunction(PyExc_OSError, "is", e.code().value(), e.what()));
            if (err) PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
        }
    });

    m.attr("PARENT_DEATH_SIGNAL") = fastspawn::kParentDeathSignal;
    m.attr("KILL_WAIT") = fastspawn::kKillWait;
    m.def(
        "child_running", [](int pid) { return fastspawn::child_running(static_cast<pid_t>(pid)); },
        py::arg("pid"),
        "Whether `pid` is a child of this process that has not exited yet (never reaps it).");
    m.def("pidfd_supported", &fastspawn::pidfd_supported,
          "Whether this kernel lets the engine watch children through pidfds.");
    m.def(
        "arm_parent_death",
        [](int owner) { return fastspawn::arm_parent_death(static_cast<pid_t>(owner)); },
        py::arg("owner"),
        "In an exec'd child: die (with everything in its process group) when `owner` dies. "
        "Returns False if `owner` is already gone.");

    m.def(
        "zygote_fork_many",
        [](int owner, const std::vector<ChildSpecFds>& children, int deferred, bool report_pids) -> py::tuple {
            std::vector<fastspawn::ChildFds> plans;
            plans.reserve(children.size());
            for (const auto& [announce, dup2s, close_fds] : children)
                plans.push_back(fastspawn::ChildFds{announce, dup2s, close_fds});
            // One before/after pair around all the clones, and no Python in between: the
            // zygote writes nothing to its (now shared, copy-on-write) heap while forking.
            std::vector<int> pids;
            pids.reserve(plans.size());  // no allocation between the clones
            PyOS_BeforeFork();
            int forked = 0;
            int error = 0;
            for (std::size_t i = 0; i < plans.size(); ++i) {
                pid_t pid = -1;
                try {
                    pid = fastspawn::zygote_fork(static_cast<pid_t>(owner));
                } catch (const std::system_error& e) {
                    error = e.code().value();
                    break;
                }
                if (pid == 0) {
                    if (static_cast<int>(i) != deferred && !fastspawn::enter_child(plans[i])) ::_exit(1);
                    PyOS_AfterFork_Child();
                    if (report_pids) return py::make_tuple(static_cast<int>(i), 0, 0, py::list());
                    return py::make_tuple(static_cast<int>(i), 0, 0);
                }
                pids.push_back(static_cast<int>(pid));
                ++forked;
            }
            PyOS_AfterFork_Parent();
            if (report_pids) return py::make_tuple(-1, forked, error, py::cast(pids));
            return py::make_tuple(-1, forked, error);
        },
        py::arg("owner"), py::arg("children"), py::arg("deferred") = -1, py::kw_only(),
        py::arg("pids") = false,
        "In the zygote: fork len(children) children of the caller back to back, each with "
        "clone(CLONE_PARENT) and its parent-death guard armed against `owner`. children[i] is (announce_fd, [(src, dst) dup2s], [fds to close]), "
        "applied in child i before Python resumes there, except in child `deferred`, which "
        "applies its own later with enter_child. Returns (i, 0, 0) in child i and "
        "(-1, forked, errno) in the zygote, errno being why the fork after them failed (0: none did). "
        "With pids=True a fourth item: [] in a child, the pids of the `forked` children in the zygote.");
    m.def(
        "enter_child",
        [](int announce, const std::vector<std::pair<int, int>>& dup2s, const std::vector<int>& close_fds) {
            if (!fastspawn::enter_child(fastspawn::ChildFds{announce, dup2s, close_fds}))
                throw std::system_error(errno, std::generic_category(), "enter_child");
        },
        py::arg("announce_fd"), py::arg("dup2s"), py::arg("close_fds"),
        "In a zygote child forked with `deferred`: own process group, stdio, closes, announce.");
    m.def(
        "trim_heap",
        [] {
#ifdef __GLIBC__
            ::malloc_trim(0);
#endif
        },
        "Give the C heap's free pages back to the system (fewer pages for each fork to copy).");
    m.def("current_umask", &fastspawn::current_umask,
          "This process's umask, read without changing it (-1 where /proc cannot tell).");

    py::class_<PyChunk>(m, "Chunk", "Immutable bytes shared by the engine and many children.")
        .def(py::init([](const py::bytes& b) {
                 char* buf = nullptr;
                 Py_ssize_t len = 0;
                 if (PyBytes_AsStringAndSize(b.ptr(), &buf, &len) != 0) throw py::error_already_set();
                 return PyChunk{std::make_shared<const std::string>(buf, static_cast<std::size_t>(len))};
             }),
             py::arg("data"))
        .def("__len__", [](const PyChunk& c) { return c.data->size(); });

    py::class_<Group>(m, "Group", "The children of one call: started, watched, stopped, reaped.")
        .def(py::init<int, bool>(), py::arg("nprocs"), py::arg("use_pidfd") = true)
        .def_property_readonly("size", &Group::size)
        .def_property_readonly("watch_mode", &Group::watch_mode)
        .def(
            "start_exec",
            [](Group& g, int rank, const std::string& exe, const std::vector<std::string>& argv,
               const std::vector<int>& pass_fds, const std::vector<PyChunk>& input, bool protocol,
               const std::optional<std::vector<std::string>>& env,
               const std::vector<std::pair<int, int>>& redirects, int death_signal) {
                std::vector<Chunk> chunks;
                chunks.reserve(input.size());
                for (const auto& c : input) chunks.push_back(c.data);
                fastspawn::ExecOptions options;
                options.protocol = protocol;
                options.replace_env = env.has_value();
                if (env) options.env = *env;
                options.redirects = redirects;
                options.death_signal = death_signal;
                g.start_exec(rank, exe, argv, pass_fds, std::move(chunks), options);
            },
            py::arg("rank"), py::arg("exe"), py::arg("argv"), py::arg("pass_fds"), py::arg("input"),
            py::kw_only(), py::arg("protocol") = true, py::arg("env") = py::none(),
            py::arg("redirects") = std::vector<std::pair<int, int>>{}, py::arg("death_signal") = 0,
            "Start `rank` as `exe argv... CONTROL_FD RESULT_FD OWNER_PID` and send it `input`. "
            "protocol=False: a foreign program (no extra argv, no pipes); env: its whole "
            "environment as b'KEY=value' items; redirects: (caller fd, child fd 0..2) pairs; "
            "death_signal: sent when the caller dies (default: fastspawn's own).")
        .def(
            "start_fork",
            [](Group& g, int rank) {
                int control = -1;
                int result = -1;
                const pid_t pid = python_fork([&] { return g.start_fork(rank, control, result); });
                return py::make_tuple(pid, control, result);
            },
            py::arg("rank"),
            "Fork the caller for `rank`: (pid, -1, -1) in the parent, "
            "(0, control_fd, result_fd) in the child.")
        .def("open_channels", &Group::open_channels, py::arg("rank"),
             "Make `rank`'s pipes for a child started elsewhere; returns the child's ends "
             "(control_read_fd, result_write_fd), which the caller must close once handed over.")
        .def(
            "adopt",
            [](Group& g, const py::object& timeout) {
                const double t = to_timeout(timeout);
                SignalCheck check;
                std::vector<int> ranks;
                {
                    py::gil_scoped_release nogil;
                    ranks = g.adopt(t, [&check] { return check(); });
                }
                if (check.raised) throw py::error_already_set();
                return ranks;
            },
            py::arg("timeout") = py::none(),
            "Wait for children started elsewhere to announce their pids; returns the ranks watched.")
        .def(
            "adopt_pid",
            [](Group& g, int rank, int pid) { return g.adopt_pid(rank, static_cast<pid_t>(pid)); },
            py::arg("rank"), py::arg("pid"),
            "Watch pending `rank` as `pid` (known from elsewhere) whether or not it ever "
            "announces itself; its announcement is still stripped from its output. False, "
            "and the rank dropped, when `pid` is not our child.")
        .def("drop_pending", &Group::drop_pending, py::arg("rank"),
             "A pending rank whose child was never made: close its pipes.")
        .def(
            "wait",
            [](Group& g, const py::object& timeout, bool all, std::size_t known,
               const std::vector<int>& watch) {
                const double t = to_timeout(timeout);
                return interruptible([&](const fastspawn::InterruptCheck& check) {
                    return g.wait(t, all, known, check, watch);
                });
            },
            py::arg("timeout") = py::none(), py::arg("all") = false, py::arg("known") = 0,
            py::arg("watch") = std::vector<int>{},
            "Block (GIL released) until more than `known` children have exited (all of them "
            "with all=True), the timeout, or one of the fds in `watch` is readable or hung "
            "up. Returns the exit log from `known` on: [(rank, pid, exitcode, output_bytes)], "
            "in the order the children ended; exitcode is None when the status is unknown "
            "(someone else reaped the child, or stop() handed it to the reaper).")
        .def(
            "stop",
            [](Group& g, double grace, int sig, double kill_wait) {
                SignalCheck check;
                fastspawn::StopReport report;
                {
                    py::gil_scoped_release nogil;
                    report = g.stop(grace, sig, kill_wait, [&check] { return check(); });
                }
                if (check.raised) throw py::error_already_set();
                py::list unreaped;
                for (const auto& u : report.unreaped)
                    unreaped.append(py::make_tuple(u.rank, u.pid, u.state));
                return py::make_tuple(py::cast(report.killed), unreaped);
            },
            py::arg("grace"), py::arg("signal") = SIGTERM, py::arg("kill_wait") = fastspawn::kKillWait,
            "The one stop (GIL released): adopt pending ranks (<= min(kill_wait, 1) s); with "
            "grace > 0 and signal != 0, `signal` to every live child and up to `grace` s for "
            "them to exit (a Python signal handler raising cuts this short; the exception is "
            "re-raised once stop is done); SIGKILL to every live child and its process group; "
            "up to `kill_wait` s for them to die. Returns (killed, unreaped): the ranks that "
            "got SIGKILL, and (rank, pid, state) of those still not dead, handed to the "
            "engine's reaper (their exit is logged with exitcode None).")
        .def("begin_stop", &Group::begin_stop,
             "From now on, reaping a child first SIGKILLs what is left in its process group.")
        .def("set_reap_strays", &Group::set_reap_strays, py::arg("on"),
             "For the zygote's group: when a child is reaped and its process group killed, "
             "children of this process left in that group that no group owns (forks killed "
             "before they announced themselves) go to the engine's reaper.")
        .def("send_signal", &Group::send_signal, py::arg("rank"), py::arg("sig"),
             py::arg("group") = false,
             "Send `sig` to `rank` through its pidfd (group=True: also to its process group, "
             "only while the child is unreaped). False when it has ended.")
        .def("pid", &Group::pid, py::arg("rank"), "The pid of `rank` (-1: not started).")
        .def("running", &Group::running, py::arg("rank"),
             "Started and not ended for the group (as of the last wait): False once reaped, "
             "reaped elsewhere, or handed to the reaper by stop().")
        .def("sentinel", &Group::sentinel, py::arg("rank"),
             "An fd that is readable once `rank` has exited (its pidfd, or the watcher's eventfd).");

    // ---- launch helper (issue 10): zygote fitness and the guardian ----
    m.def(
        "zygote_fork_check",
        []() -> std::optional<std::string> {
            const char* reason = fastspawn::zygote_fork_check();
            if (reason == nullptr) return std::nullopt;
            return std::string(reason);
        },
        "None when this process can fork ranks with clone(CLONE_PARENT), else why not.");
    m.def("guardian_pid", &fastspawn::guardian_pid,
          "The pid of this process's guardian of foreign programs (0: none running).");
    // ---- end launch helper ----
}
