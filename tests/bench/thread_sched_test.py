#!/usr/bin/env python3
"""bench/thread_sched.py: against a child process with a named thread that spins and one that
sleeps, it ends by itself when the child exits and reports the spinning thread's CPU time under
its name (and next to none for the sleeping one); a missing process is refused."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "thread_sched.py")

CHILD = r"""
import ctypes, threading, time
libc = ctypes.CDLL(None)
def named(name, body):
    def run():
        libc.prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME: this thread's name
        body()
    return threading.Thread(target=run)
def spin():
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        pass
spinner = named("test-spinner", spin)
sleeper = named("test-sleeper", lambda: time.sleep(1.5))
spinner.start(); sleeper.start()
print("ready", flush=True)
spinner.join(); sleeper.join()
"""


def main():
    failures = []
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    child.stdout.readline()  # both threads named and running
    try:
        out = subprocess.run([sys.executable, SCRIPT, "--pid", str(child.pid), "--interval", "0.1"],
                             capture_output=True, text=True, timeout=30)
    finally:
        child.wait()
    if out.returncode != 0:
        failures.append("exit %d: %s" % (out.returncode, out.stderr))
    rows = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("test-"):
            rows[cells[0]] = float(cells[2])
    if "stolen by the host" not in out.stdout:
        failures.append("no machine line:\n" + out.stdout)
    if rows.get("test-spinner", 0) < 0.5:
        failures.append("test-spinner should have about 1.5 s of CPU:\n" + out.stdout)
    if rows.get("test-sleeper", 0.0) > 0.1:  # a thread with no CPU and no wait is left out
        failures.append("test-sleeper should have next to no CPU:\n" + out.stdout)
    missing = subprocess.run([sys.executable, SCRIPT, "--pid", "999999999"], capture_output=True, text=True)
    if missing.returncode == 0 or "no process" not in missing.stderr:
        failures.append("a missing process should be refused: %d %s" % (missing.returncode, missing.stderr))
    for f in failures:
        print("FAIL:", f)
    print("thread_sched_test: %s" % ("FAILED" if failures else "ok"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
