#!/usr/bin/env python3
"""`pkv-bench --help` speaks to its user (run by CTest as pkv_bench_help_test).

Checks that `pkv-bench --help` exits 0 and lists every subcommand with its flags; that
`pkv-bench <subcommand> --help` lists that subcommand's flags as --name=default; that the parser
accepts every flag the help lists (a short `memory` run with each listed flag passed at its
listed default); and that usage errors exit 2 and point at --help.
Prints one PASS/FAIL line per check; exits 1 on a failure.
"""
import argparse
import re
import subprocess
import sys

SUBCOMMANDS = ("kernels", "trace", "memory", "ingest")
MEMORY_FLAGS = {"trace_csv", "batch", "requests", "max_output", "static_slot_tokens", "page", "layers", "hkv",
                "d", "md", "commit"}
FLAG_LINE = re.compile(r"^  --([a-z0-9_-]+)=(.*)$", re.M)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", required=True, help="the pkv-bench binary")
    a = ap.parse_args()
    failed = []

    def check(name, ok, detail=""):
        print(("PASS " if ok else "FAIL ") + name + ("" if ok or not detail else f": {detail}"))
        if not ok:
            failed.append(name)

    def run(*args):
        p = subprocess.run([a.bench, *args], capture_output=True, text=True, timeout=120)
        return p.returncode, p.stdout, p.stderr

    rc, out, err = run("--help")
    check("--help exits 0", rc == 0, err[-300:])
    for sub in SUBCOMMANDS:
        check(f"--help lists `{sub}`", re.search(rf"^  {sub} ", out, re.M) is not None)
    check("--help shows flags", len(FLAG_LINE.findall(out)) >= len(MEMORY_FLAGS), out[-300:])
    check("--help points at no source file", ".cc" not in out and "comment" not in out)

    for sub in SUBCOMMANDS:
        rc, out, err = run(sub, "--help")
        flags = dict(FLAG_LINE.findall(out))
        built = "Not in this build" not in out
        check(f"{sub} --help exits 0", rc == 0, err[-300:])
        check(f"{sub} --help lists its flags (or says the build lacks it)", bool(flags) == built, out[-300:])

    rc, out, _ = run("memory", "--help")
    listed = dict(FLAG_LINE.findall(out))
    check("memory --help lists exactly memory's flags", set(listed) == MEMORY_FLAGS, str(sorted(listed)))
    # Every listed flag parses, at its listed default (the run itself is kept short).
    short = {"requests": "6", "batch": "2", "layers": "1", "md": "", "commit": "help-test"}
    args = [f"--{k}={short.get(k, v)}" for k, v in listed.items()]
    rc, out, err = run("memory", *args)
    check("memory accepts every flag its --help lists", rc == 0 and "paged" in out, (err or out)[-300:])

    rc, _, err = run("memory", "--no_such_flag=1")
    check("unknown flag: exit 2, points at --help", rc == 2 and "--help" in err, err[-300:])
    rc, _, err = run("memory", "--batch=0")
    check("bad value: exit 2", rc == 2, err[-300:])
    rc, _, err = run()
    check("no subcommand: exit 2, points at --help", rc == 2 and "--help" in err, err[-300:])
    rc, _, err = run("nonsense")
    check("unknown subcommand: exit 2, points at --help", rc == 2 and "--help" in err, err[-300:])

    print(f"pkv_bench_help_test: {'FAILED ' + str(len(failed)) if failed else 'all passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
