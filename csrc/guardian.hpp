// The guardian: foreign programs die with the process that started them (their owner),
// however the owner dies, SIGKILL included.
//
// A program started by exec_child with ExecPlan::program set cannot install our
// parent-death handler (launch.cpp), so the owner hands it to the guardian: one small
// process per owner, started at the first guardian_watch. The guardian holds a pidfd of
// every watched program and the far end of a socket whose near end only the owner holds
// (close-on-exec, closed in fork children by an atfork handler). When the owner is gone
// (the kernel closes its end whatever killed it) the guardian sends SIGKILL to each
// watched program's process group, then to the program itself through its pidfd, and
// exits. It is a sibling, not a child: it is created by a short-lived intermediate that
// the owner reaps at once, so the owner never has it as a child to reap, os.wait() in
// user code never sees it, and it survives signals to the owner's process group (its
// own session; every signal blocked, so Ctrl-C at the terminal leaves it in place for
// the programs). Its name in ps is "fastspawn-guard".
//
// Programs started from the owner's main thread also get PR_SET_PDEATHSIG=SIGKILL, a
// first line of defence that needs no guardian (not from other threads: the signal
// follows the creating *thread*, whose end would kill the program while the owner lives).
//
// Bounds and what escapes (for the README):
// - Within a second: in practice milliseconds (a process wake-up and a few kill calls).
// - What is killed: each watched program and every process in its process group at the
//   moment the owner dies, descendants included, whatever they do with signals.
// - Escapes: a descendant that left the program's process group (setsid, setpgid: daemons,
//   `setsid cmd`, a shell's job control with `set -m`), since the guardian kills by group.
//   A program that is itself SIGKILLed/reaped before the owner dies is forgotten at its
//   reap (guardian_forget): what it left in its group is no longer the guardian's.
// - Not covered: the guardian itself SIGKILLed or SIGSTOPped by someone before the owner
//   dies (a new one is started at the next guardian_watch, which re-watches every pid
//   still watched); an OOM kill of the owner also kills the guardian, which shares its
//   memory, unless the guardian could lower its own oom_score_adj to -1000 (root /
//   CAP_SYS_RESOURCE); then only PR_SET_PDEATHSIG is left.
// - The watch starts right after the exec: a program started from a thread other than the
//   main one (so without PR_SET_PDEATHSIG) by an owner killed within those microseconds
//   is not covered.
// - At most kGuardianCapacity programs per owner at once; beyond that (and where the
//   guardian cannot start) a program has only PR_SET_PDEATHSIG=SIGKILL, set whatever
//   thread started it.
// - Architectures: x86-64 and AArch64 (the guardian runs on raw system calls). Elsewhere
//   guardian_available() is false and programs get PR_SET_PDEATHSIG=SIGKILL only.
#pragma once

#include <cstddef>

#include <sys/types.h>

namespace fastspawn {

// Programs the guardian of one owner watches at once.
constexpr std::size_t kGuardianCapacity = 512;

// Whether a program started now will be watched: starts the guardian if need be and
// reserves nothing; false when it cannot start, is full, or the platform has none.
bool guardian_available() noexcept;

// Right after `pid` (our child, not reaped) exec'd: watch it. Idempotent for a pid
// already watched. Silently does nothing when the guardian is unavailable or full.
void guardian_watch(pid_t pid) noexcept;

// In reap(), while `pid` is still an unreaped zombie and before the final waitid: stop
// watching it. A pid never watched: nothing happens.
void guardian_forget(pid_t pid) noexcept;

// Ends this process's guardian (which SIGKILLs what is still watched) and waits up to
// a second for it to exit, then frees its stack (kept if it has not exited). Optional:
// the owner's exit does the same. The next guardian_watch starts a new guardian.
void guardian_shutdown() noexcept;

// In a fork child of the owner (async-signal-safe): drop the owner's end of the socket
// and the guardian's state; the child starts a guardian of its own if it needs one.
// Registered with pthread_atfork when the first guardian starts; callable again safely.
void guardian_after_fork_child() noexcept;

// The guardian's pid (0: none running), for tests.
pid_t guardian_pid() noexcept;

}  // namespace fastspawn
