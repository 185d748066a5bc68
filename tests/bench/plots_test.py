#!/usr/bin/env python3
"""bench/plots.py draws each figure from small recorded-format CSVs, and refuses a CSV that lacks
a column with a message naming the file and the column. Exit 77 (skipped) without matplotlib."""
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLOTS = os.path.join(ROOT, "bench", "plots.py")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def run(*args):
    return subprocess.run([sys.executable, PLOTS, *args], capture_output=True, text=True)


def main():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("skipped: matplotlib is not installed (Debian: python3-matplotlib; scripts/setup.sh installs it)")
        return 77
    failures = []
    with tempfile.TemporaryDirectory() as d:
        kernels = os.path.join(d, "kernels.csv")
        write(kernels, "# gpu=test\n"
              "dtype,case,group,batch,tokens,kv_bytes,family,config,launches,median_us,gbps,pct_stream,pct_d2d,best,kv_copies,speedup_vs_fi\n"
              "fp16,B1x2048,grid,1,2048,1,per_request,per_request,1,10,1,20.5,1,0,1,\n"
              "fp16,B1x2048,grid,1,2048,1,sequence_split,split_fused/S8,1,5,1,41.0,1,1,1,\n"
              "fp16,B1x2048,grid,1,2048,1,planned,planned:split_fused/S8,1,5,1,40.5,1,0,1,\n"
              "fp16,B8_bimodal/s0,B8_bimodal,8,9000,1,workqueue_fused,wq_fused/T264,1,5,1,85.0,1,1,1,\n"
              "fp16,B8_bimodal/s0,B8_bimodal,8,9000,1,fi_prefill,fi_prefill,1,5,1,86.0,1,0,1,\n")
        trace = os.path.join(d, "trace.csv")
        write(trace, "dtype,workload,batch,seed,arm,tokens,attend_s,wall_s,tok_per_s_attend,tok_per_s_wall,p50_step_attend_ms,p99_step_attend_ms,p50_step_wall_ms,p99_step_wall_ms,kv_gbps,mix\n"
              "fp16,bimodal,8,1,adaptive,10,1,1,1000,900,1,1,1,1,1,x\n"
              "fp16,bimodal,8,1,fi_prefill,10,1,1,950,950,1,1,1,1,1,x\n"
              "fp16,bimodal,8,1,fi_decode,10,1,1,700,650,1,1,1,1,1,x\n")
        replay = os.path.join(d, "e2e")
        os.makedirs(replay)
        for name, reserved in (("azure_conv", 2 << 30), ("azure_conv_static", 9 << 30)):
            rows = ["kind,t_s,value,value2"]
            rows += [f"tokens,{0.1 * i:.3f},{8 - i % 3}," for i in range(40)]
            rows += [f"tbt,{0.1 * i:.3f},{5 + i % 7}," for i in range(40)]
            rows += [f"kv,{0.5 * i:.3f},{reserved + i},{1 << 30}" for i in range(8)]
            write(os.path.join(replay, name + ".timeline.csv"), "\n".join(rows) + "\n")
        out = os.path.join(d, "out")
        r = run("--kernels", kernels, "--trace", trace, "--replay", replay, "--out", out)
        if r.returncode != 0:
            failures.append(f"plots.py failed ({r.returncode}): {r.stderr}")
        for png in ("kernels_pct_ceiling.png", "trace_vs_flashinfer.png", "replay_tbt_tokens.png", "replay_kv_reserved.png"):
            p = os.path.join(out, png)
            if not os.path.exists(p):
                failures.append(f"{png} was not written")
                continue
            with open(p, "rb") as f:
                head = f.read(8)
            if head != b"\x89PNG\r\n\x1a\n" or os.path.getsize(p) < 5000:
                failures.append(f"{png} is not a drawn PNG ({os.path.getsize(p)} bytes)")
        # Beside the input by default.
        r = run("--kernels", kernels, "--trace", "", "--replay", "")
        if r.returncode != 0 or not os.path.exists(os.path.join(d, "kernels_pct_ceiling.png")):
            failures.append(f"default output beside the CSV: rc {r.returncode}, {r.stderr}")
        # A trace CSV without the wall column: a clear error naming the file and the column.
        bad = os.path.join(d, "bad.csv")
        write(bad, "dtype,workload,batch,arm,tok_per_s_attend\nfp16,bimodal,8,adaptive,1\n")
        r = run("--kernels", "", "--trace", bad, "--replay", "")
        if r.returncode != 1 or "bad.csv" not in r.stderr or "tok_per_s_wall" not in r.stderr:
            failures.append(f"missing column not reported: rc {r.returncode}, stderr {r.stderr!r}")
        # A replay folder without the static baseline's timeline: the missing file is named.
        os.remove(os.path.join(replay, "azure_conv_static.timeline.csv"))
        r = run("--kernels", "", "--trace", "", "--replay", replay, "--out", out)
        if r.returncode != 1 or "azure_conv_static.timeline.csv" not in r.stderr:
            failures.append(f"missing timeline not reported: rc {r.returncode}, stderr {r.stderr!r}")
    for f in failures:
        print("FAIL:", f)
    print("plots_test:", "FAILED" if failures else "passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
