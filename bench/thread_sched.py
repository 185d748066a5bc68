#!/usr/bin/env python3
"""Where a process's threads waited for a CPU: per thread name, CPU time and run-queue wait.

Samples /proc/PID/task/*/schedstat (time on a CPU, time runnable but waiting for one, time
slices) and the machine's steal time (/proc/stat: time the hypervisor ran something else on
this machine's virtual CPUs) every --interval seconds, until the process exits or this script is
stopped (SIGINT / SIGTERM), then prints per thread name:

  threads, CPU seconds, run-queue wait seconds, wait per CPU second, and the largest run-queue
  wait of one interval of one thread of that name,

and the machine's CPU busy and steal shares over the same time. The worker names its threads
(pkv-decode, pkv-ring, pkv-ingest, pkv-copy, ...; docs/ARCHITECTURE.md), so a decode thread that
waited for a core shows under its own name. A stall that neither run-queue wait nor steal time
explains happened with the thread on its CPU (page faults, memory, or a host that stops the
virtual CPU without accounting it as steal).

  bench/thread_sched.py --pid $(pidof pkv-worker) --interval 0.5 --csv sched.csv

--csv also writes every interval's per-name deltas, stamped with the Unix time (to line them up
with the worker's log lines), and the machine's busy and stolen CPU time of that interval (rows
"(machine busy)" and "(machine steal)", in ms over all CPUs; /proc/stat counts in 10 ms ticks).
Linux only; needs read access to
/proc/PID (the same user, or root).
"""
import argparse
import collections
import os
import signal
import sys
import time


def read_threads(pid):
    """tid -> (name, run_ns, wait_ns, slices) of the live threads of `pid`."""
    out = {}
    base = "/proc/%d/task" % pid
    try:
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return None  # exited, not yet reaped by its parent
        tids = os.listdir(base)
    except (OSError, IndexError):
        return None
    for tid in tids:
        try:
            with open("%s/%s/comm" % (base, tid)) as f:
                name = f.read().strip()
            with open("%s/%s/schedstat" % (base, tid)) as f:
                run_ns, wait_ns, slices = (int(x) for x in f.read().split()[:3])
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        out[int(tid)] = (name, run_ns, wait_ns, slices)
    return out


def read_cpu():
    """(busy, steal, total) jiffies of all CPUs, from /proc/stat's first line."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    total = sum(fields[:8])
    return user + nice + system + irq + softirq, steal, total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pid", type=int, required=True, help="process to watch")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples [1.0]")
    ap.add_argument("--csv", default="", help="also write each interval's per-name deltas here")
    ap.add_argument("--out", default="", help="write the summary here too")
    args = ap.parse_args()
    if args.interval <= 0:
        ap.error("--interval must be > 0")

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))

    first = read_threads(args.pid)
    if first is None:
        sys.exit("thread_sched.py: no process %d" % args.pid)
    cpu0 = read_cpu()
    t0 = time.monotonic()
    prev = first
    totals = collections.defaultdict(lambda: [0, 0, 0])  # name -> run_ns, wait_ns, slices
    tids_by_name = collections.defaultdict(set)
    worst = collections.defaultdict(int)  # name -> largest wait_ns of one thread in one interval
    csv = open(args.csv, "w") if args.csv else None
    if csv:
        csv.write("t_s,unix_s,name,threads,cpu_ms,wait_ms,max_thread_wait_ms\n")
    tick_ms = 1000.0 / os.sysconf("SC_CLK_TCK")
    cpu_last = cpu0
    while not stop:
        time.sleep(args.interval)
        now = read_threads(args.pid)
        if now is None:
            break
        cpu_before = cpu_last
        cpu_last = read_cpu()
        interval = collections.defaultdict(lambda: [0, 0, 0, 0])  # threads, run, wait, largest wait
        for tid, (name, run, wait, _) in now.items():
            p = prev.get(tid)
            dr, dw = (run - p[1], wait - p[2]) if p else (run, wait)
            acc = interval[name]
            acc[0] += 1
            acc[1] += dr
            acc[2] += dw
            acc[3] = max(acc[3], dw)
            worst[name] = max(worst[name], dw)
            tids_by_name[name].add(tid)
            totals[name][0] += dr
            totals[name][1] += dw
        if csv:
            t, unix = time.monotonic() - t0, time.time()
            for name, (n, dr, dw, mw) in sorted(interval.items()):
                csv.write("%.2f,%.3f,%s,%d,%.3f,%.3f,%.3f\n" % (t, unix, name, n, dr / 1e6, dw / 1e6, mw / 1e6))
            csv.write("%.2f,%.3f,(machine busy),0,%.1f,0,0\n" % (t, unix, (cpu_last[0] - cpu_before[0]) * tick_ms))
            csv.write("%.2f,%.3f,(machine steal),0,%.1f,0,0\n" % (t, unix, (cpu_last[1] - cpu_before[1]) * tick_ms))
        prev = now
    seconds = time.monotonic() - t0
    busy0, steal0, total0 = cpu0
    busy1, steal1, total1 = cpu_last
    dt = max(1, total1 - total0)
    tick_s = 1.0 / os.sysconf("SC_CLK_TCK")
    lines = ["thread_sched.py: pid %d, %.1f s, every %.2f s; the machine's CPUs %.1f%% busy, %.3f%% stolen by the host "
             "(%.0f ms of CPU time over all CPUs)"
             % (args.pid, seconds, args.interval, 100.0 * (busy1 - busy0) / dt, 100.0 * (steal1 - steal0) / dt,
                1000.0 * (steal1 - steal0) * tick_s),
             "| thread | threads | CPU s | run-queue wait s | wait per CPU s | largest wait of one thread in one interval, ms |",
             "|---|---|---|---|---|---|"]
    for name, (run, wait, _) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        if run == 0 and wait == 0:
            continue
        lines.append("| %s | %d | %.3f | %.3f | %.3f | %.2f |" % (
            name, len(tids_by_name[name]), run / 1e9, wait / 1e9, wait / run if run else 0.0, worst[name] / 1e6))
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if csv:
        csv.close()


if __name__ == "__main__":
    main()
