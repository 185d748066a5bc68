#!/usr/bin/env python3
"""The Grafana dashboard and the alerting rules, proven against a real Prometheus (CTest: observability_test).

What it runs (all on loopback, all in one temp dir, every process stopped on exit):
  1. `promtool check rules` on the chart's rules file and `promtool test rules` on
     tests/observability/alerts_test.yaml (a firing and a non-firing case per alert).
  2. pkv-worker (CPU backend, a small shape, --listen/--metrics_listen on port 0) and Debian's
     Prometheus (scrape and rule evaluation every 1 s, the chart's rules file in rule_files, the
     target labelled namespace/pod like the chart's ServiceMonitor does).
  3. Traffic: one Release of an unknown sequence over a hand-made gRPC call (NOT_FOUND, so an
     error series moves) and a short pkv-replay (~3 s); then it waits until Prometheus has
     scraped the results and evaluated every rule after them.
  4. Checks, each a PASS/FAIL line, all at one evaluation instant:
     - every target expression of every dashboard panel (Grafana variables replaced: $namespace,
       $job, $pod by their "All" value .*, $__rate_interval by 10s, ...) returns a series through
       /api/v1/query, and every {{label}} of its legend is a label of every series it returns;
     - every template-variable query label_values(m, l) finds a value of l;
     - the stat panels a healthy, lightly loaded worker must show green (workers up / ready, KV
       pool free ratio) are green: the live value through the panel's own thresholds;
     - every pkv_* name in a panel or an alert is a metric the worker exports (so `... or vector(0)`
       cannot hide a renamed metric);
     - every metric family the worker serves on /metrics (pkv_*, process_*, prometheus-cpp's
       exposer_*) is in a table of docs/METRICS.md with the type the worker declares, and every
       family the tables list is served;
     - the alerts Prometheus loaded are exactly the expected seven, each healthy (evaluated without
       error), with `for`, a severity label and summary/description annotations; each whole
       expression evaluates without error, and its signal -- the expression without its trailing
       `<op> <number>` comparison, which every shipped alert must end in (comparisons bind looser
       than arithmetic in PromQL, so what is left is exactly the compared value) -- returns a
       series: an alert that is silent only because its metric does not exist fails here.
     - alerts_test.yaml has, for every alert, an evaluation where it fires and one where it does
       not.
Exit status 0 when everything passes, 1 otherwise. Standard library only.
"""
import argparse
import calendar
import ctypes
import json
import os
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

EXPECTED_ALERTS = {"PersistentKVWorkerDown", "PersistentKVPoolNearlyFull", "PersistentKVHighErrorRate",
                   "PersistentKVStepLatencyHigh", "PersistentKVRequestLatencyHigh", "PersistentKVPredictionDrift",
                   "PersistentKVProcessStalled"}
JOB = "persistentkv"  # the job the rules file selects (the chart rewrites it per release)
TARGET_LABELS = {"namespace": "pkv-observability-test", "pod": "pkv-worker-0"}
# Stat panels that must be green for this test's worker (up, ready, its pool nearly empty).
HEALTHY_GREEN_STATS = ("Workers up / ready", "KV pool free ratio (min over pods)")
# Concrete values of Grafana's built-in variables (scrape interval 1 s: $__rate_interval would be 4 s).
GRAFANA_BUILTINS = {"__rate_interval": "10s", "__interval": "5s", "__range": "1m", "__range_s": "60",
                    "__interval_ms": "5000", "__range_ms": "60000"}
# A trailing top-level comparison with a number: `... > 0.05`, `... == 0`, `... < bool 1`.
TRAILING_COMPARISON = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*(bool\s+)?[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


class Failure(Exception):
    pass


# ---- processes --------------------------------------------------------------------------------
def _die_with_parent():
    # Children get SIGKILL when this process dies, even if it is killed with SIGKILL (CTest timeout).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Processes:
    def __init__(self):
        self.procs = []  # (name, Popen)

    def start(self, name, argv, **kw):
        proc = subprocess.Popen(argv, preexec_fn=_die_with_parent, **kw)
        self.procs.append((name, proc))
        return proc

    def stop_all(self):
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                print(f"NOTE {name} ignored SIGTERM for 10 s: killing it")
                proc.kill()
                proc.wait(timeout=5)


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()

    def wait_for(self, what, fn, limit, period=0.25):
        """Polls fn() until it returns a truthy value, for at most `limit` seconds (and the deadline)."""
        end = min(self.end, time.monotonic() + limit)
        last_error = None
        while True:
            try:
                value = fn()
                if value:
                    return value
            except Failure:
                raise
            except Exception as e:  # connection refused while starting, etc.
                last_error = e
            if time.monotonic() >= end:
                raise Failure(f"timed out waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))
            time.sleep(period)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path, n=40):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# ---- a hand-made unary gRPC call (HTTP/2 prior knowledge, HPACK literals, no dependencies) ------
def _h2_frame(ftype, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


def _hpack_int(value, prefix_bits, first=0):
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _hpack_literal(name, value):
    # Literal header field without indexing, new name, no Huffman coding (RFC 7541 6.2.2).
    n, v = name.encode(), value.encode()
    return b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v


def grpc_unary_call(host, port, path, message, timeout=5.0):
    """Sends one unary gRPC request and reads until the server ends stream 1. The status is not
    decoded here (the server's HPACK may use Huffman coding); callers check its metrics instead."""
    headers = b"".join(_hpack_literal(k, v) for k, v in [
        (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", f"{host}:{port}"),
        ("content-type", "application/grpc"), ("te", "trailers")])
    body = b"\x00" + struct.pack(">I", len(message)) + message
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(0x4, 0, 0, b"")
                  + _h2_frame(0x1, 0x4, 1, headers) + _h2_frame(0x0, 0x1, 1, body))
        buf = b""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            while len(buf) >= 9:
                length = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + length:
                    break
                ftype, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                payload, buf = buf[9:9 + length], buf[9 + length:]
                if ftype == 0x4 and not flags & 0x1:
                    s.sendall(_h2_frame(0x4, 0x1, 0, b""))  # SETTINGS ack
                elif ftype == 0x6 and not flags & 0x1:
                    s.sendall(_h2_frame(0x6, 0x1, 0, payload))  # PING ack
                elif stream == 1 and (ftype == 0x3 or (ftype in (0x0, 0x1) and flags & 0x1)):
                    return True  # RST_STREAM or END_STREAM
                elif ftype == 0x7:
                    raise Failure("the worker sent GOAWAY to the hand-made gRPC call")
    raise Failure(f"no end of stream for {path}")


def release_request(sequence_id):
    """pkv.v1.ReleaseRequest{sequence_ids: [sequence_id]} (field 1, packed varints)."""
    varint = bytearray()
    v = sequence_id
    while True:
        b = v & 0x7F
        v >>= 7
        varint.append(b | (0x80 if v else 0))
        if not v:
            break
    return b"\x0a" + bytes([len(varint)]) + bytes(varint)


# ---- Prometheus HTTP API ----------------------------------------------------------------------
class PromAPI:
    def __init__(self, base):
        self.base = base

    def get(self, path, **params):
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422 carry a JSON error body
            try:
                body = json.load(e)
            except ValueError:
                raise Failure(f"{path}: HTTP {e.code}")
        if body.get("status") != "success":
            raise Failure(f"{body.get('errorType', 'error')}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr, at=None):
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.get("/api/v1/query", **params)
        if data["resultType"] in ("vector", "matrix"):
            return data["result"]
        return [{"metric": {}, "value": data["result"]}]  # scalar / string


# ---- dashboard --------------------------------------------------------------------------------
def dashboard_targets(board):
    """(panel title, refId, expr, legendFormat) of every query target, rows' nested panels included."""
    out = []

    def walk(panels):
        for p in panels or []:
            for t in p.get("targets") or []:
                if t.get("expr") is not None:
                    out.append((p.get("title", f"panel {p.get('id')}"), t.get("refId", "?"), t["expr"],
                                t.get("legendFormat", "")))
            walk(p.get("panels"))

    walk(board.get("panels"))
    return out


def grafana_variables(board):
    """Name -> concrete value: Grafana's built-ins, and each template variable's "All" value
    (allValue, default .*) or its current value."""
    values = dict(GRAFANA_BUILTINS)
    for v in (board.get("templating") or {}).get("list", []):
        if v.get("type") == "datasource":
            continue
        if v.get("includeAll"):
            values[v["name"]] = v.get("allValue") or ".*"
        else:
            cur = (v.get("current") or {}).get("value")
            values[v["name"]] = cur[0] if isinstance(cur, list) and cur else (cur or ".*")
    return values


VAR_RE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)\]\]|\$(\w+)")


def substitute(expr, values):
    unknown = []

    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            unknown.append(name)
            return m.group(0)
        return values[name]

    out = VAR_RE.sub(repl, expr)
    if unknown:
        raise Failure(f"unknown Grafana variable(s) {sorted(set(unknown))}")
    return out


def metric_names(expr):
    # Names of pkv_ series selected by the expression (label values in quotes are skipped).
    return set(re.findall(r"\bpkv_[a-zA-Z0-9_]*", re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)))


# ---- the test ---------------------------------------------------------------------------------
class Test:
    def __init__(self, a):
        self.a = a
        self.passed = 0
        self.failed = []

    def check(self, name, ok, detail=""):
        if ok:
            self.passed += 1
            print(f"PASS {name}" + (f" ({detail})" if detail else ""))
        else:
            self.failed.append(name)
            print(f"FAIL {name}" + (f": {detail}" if detail else ""))
        sys.stdout.flush()
        return ok

    def run_promtool(self):
        a = self.a
        r = subprocess.run([a.promtool, "check", "rules", a.rules], capture_output=True, text=True, timeout=30)
        self.check("promtool check rules " + os.path.relpath(a.rules, a.source_dir), r.returncode == 0,
                   (r.stdout + r.stderr).strip().replace("\n", " | "))
        m = re.search(r"SUCCESS: (\d+) rules found", r.stdout + r.stderr)
        self.rule_count = int(m.group(1)) if m else None
        r = subprocess.run([a.promtool, "test", "rules", a.alerts_test], capture_output=True, text=True, timeout=60)
        self.check("promtool test rules " + os.path.relpath(a.alerts_test, a.source_dir), r.returncode == 0,
                   (r.stdout + r.stderr).strip()[-3000:])
        # Coverage: per alert, one evaluation where it fires and one where it stays silent.
        with open(a.alerts_test) as f:
            text = f.read()
        cases = {}
        for block in re.split(r"\n\s*- eval_time:", text)[1:]:
            m = re.search(r"alertname:\s*(\S+)", block)
            if not m:
                continue
            silent = re.search(r"exp_alerts:\s*\[\s*\]", block) is not None
            cases.setdefault(m.group(1), set()).add("silent" if silent else "fires")
        for alert in sorted(EXPECTED_ALERTS):
            self.check(f"alerts_test.yaml: {alert} has a firing and a non-firing case",
                       cases.get(alert) == {"fires", "silent"}, str(sorted(cases.get(alert, []))))

    def run_live(self, procs, tmp, deadline):
        a = self.a
        # -- pkv-worker --
        worker_log = os.path.join(tmp, "worker.log")
        with open(worker_log, "w") as log:
            worker = procs.start("pkv-worker", [
                a.worker, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0", "--backend=cpu",
                "--num_layers=2", "--num_q_heads=8", "--num_kv_heads=2", "--head_dim=64", "--page_size=16",
                "--dtype=fp16", "--num_pages=2048", "--cpu_threads=1", "--shutdown_grace_s=2"],
                stdout=subprocess.PIPE, stderr=log, text=True)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in worker.stdout], daemon=True).start()
        ports = {}

        def worker_ports():
            if worker.poll() is not None:
                raise Failure(f"pkv-worker exited with {worker.returncode}:\n{tail(worker_log)}")
            while not lines.empty():
                line = lines.get()
                m = re.search(r"pkv-worker metrics on port (\d+)", line)
                if m:
                    ports["metrics"] = int(m.group(1))
                m = re.search(r"pkv-worker listening on ([\d.]+):(\d+)", line)
                if m:
                    ports["grpc"] = int(m.group(2))
            return len(ports) == 2

        try:
            deadline.wait_for("pkv-worker to print its ports", worker_ports, 30, 0.05)
        except Failure:
            print(tail(worker_log))
            raise
        print(f"NOTE pkv-worker: gRPC 127.0.0.1:{ports['grpc']}, metrics 127.0.0.1:{ports['metrics']}")

        # -- Prometheus --
        config = os.path.join(tmp, "prometheus.yml")
        with open(config, "w") as f:
            f.write(f"""global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {json.dumps(os.path.abspath(a.rules))}
scrape_configs:
  - job_name: {JOB}
    static_configs:
      - targets: ["127.0.0.1:{ports['metrics']}"]
        labels: {json.dumps(TARGET_LABELS)}
""")
        prom_log = os.path.join(tmp, "prometheus.log")
        api = None
        for attempt in range(3):  # the free port may be taken between the probe and the bind
            port = free_port()
            with open(prom_log, "w") as log:
                prom = procs.start("prometheus", [
                    a.prometheus, f"--config.file={config}", f"--storage.tsdb.path={os.path.join(tmp, 'tsdb')}",
                    f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
                    f"--web.console.templates={tmp}", f"--web.console.libraries={tmp}"],
                    stdout=log, stderr=subprocess.STDOUT)
            api = PromAPI(f"http://127.0.0.1:{port}")

            def ready():
                if prom.poll() is not None:
                    return "exited"
                with urllib.request.urlopen(api.base + "/-/ready", timeout=2) as r:
                    return r.status == 200

            state = deadline.wait_for("Prometheus to be ready", ready, 30)
            if state is True:
                break
            print(f"NOTE Prometheus exited at start (attempt {attempt + 1}):\n{tail(prom_log, 10)}")
        else:
            raise Failure("Prometheus did not start")
        self.prom_log = prom_log
        print(f"NOTE Prometheus {api.base} (config {config})")

        up = f'up{{job="{JOB}"}}'
        deadline.wait_for("Prometheus to scrape the worker (up == 1)",
                          lambda: any(s["value"][1] == "1" for s in api.query(up)), 20)

        # -- traffic: one NOT_FOUND, then a short replay --
        grpc_unary_call("127.0.0.1", ports["grpc"], "/pkv.v1.PersistentKV/Release", release_request(1))
        replay_log = os.path.join(tmp, "replay.log")
        with open(replay_log, "w") as log:
            replay = procs.start("pkv-replay", [
                a.replay, f"--target=127.0.0.1:{ports['grpc']}", "--workload=bimodal", "--context_scale=0.0625",
                "--num_requests=8", "--batch=4", "--seed=20260623", "--check_fraction=0.05", "--progress_s=0"],
                stdout=log, stderr=subprocess.STDOUT)
            try:
                rc = replay.wait(timeout=max(1, min(40, deadline.left() - 20)))
            except subprocess.TimeoutExpired:
                raise Failure(f"pkv-replay did not finish:\n{tail(replay_log)}")
        done = rc == 0 and "8/8 done" in tail(replay_log, 100)
        self.check("pkv-replay ran the workload", done, "8/8 requests done" if done else f"exit {rc}\n{tail(replay_log)}")

        # -- wait for the scrape after the traffic, then for rule evaluations after that --
        moved = (f'pkv_decode_tokens_total{{job="{JOB}"}} > 0 and on (instance) '
                 f'pkv_rpc_requests_total{{job="{JOB}",method="Release",code="NOT_FOUND"}} > 0 and on (instance) '
                 f'pkv_rpc_requests_total{{job="{JOB}",method="StepStream",code="OK"}} > 0')
        deadline.wait_for("the replay's counters in Prometheus", lambda: api.query(moved), 20)
        self.check("worker counted the hand-made Release of an unknown sequence as NOT_FOUND", True)
        seen_at = time.time()
        deadline.wait_for("a few samples of up", lambda: any(
            float(s["value"][1]) >= 5 for s in api.query(f"count_over_time({up}[1m])")), 20)

        def rules_evaluated_after_traffic():
            groups = api.get("/api/v1/rules")["groups"]
            stamps = [r.get("lastEvaluation", "") for g in groups for r in g["rules"]]
            if not stamps:
                return False
            def epoch(s):  # RFC 3339 with fractional seconds and an offset
                m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", s)
                if not m or s.startswith("0001"):
                    return 0
                off = 0 if m.group(3) == "Z" else (int(m.group(3)[1:3]) * 3600 + int(m.group(3)[4:6]) * 60) * (
                    1 if m.group(3)[0] == "+" else -1)
                return calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) - off + float(m.group(2) or 0)
            return all(epoch(s) > seen_at for s in stamps) and groups
        groups = deadline.wait_for("every rule evaluated after the traffic", rules_evaluated_after_traffic, 20)

        self.check_metrics_documented(ports["metrics"])
        at = time.time()
        exported = set(api.get("/api/v1/label/__name__/values"))
        self.check_dashboard(api, at, exported)
        self.check_alerts(api, at, exported, groups)

    def check_metrics_documented(self, metrics_port):
        """Every family on the worker's /metrics is documented in docs/METRICS.md with its type,
        and every documented family is served."""
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        served = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
        with open(self.a.metrics_doc) as f:
            doc = f.read()
        # Table rows: | `family` | type ... | labels | meaning |
        documented = {}
        for name, kind in re.findall(r"^\|\s*`([a-z_:][a-z0-9_:]*)`\s*\|\s*([a-z]+)", doc, re.M):
            documented[name] = kind
        self.check("the worker serves metric families", len(served) > 20, f"{len(served)} families")
        undocumented = sorted(n for n in served if n not in documented)
        self.check("docs/METRICS.md documents every family the worker serves", not undocumented,
                   f"undocumented: {undocumented}")
        wrong = sorted(f"{n}: served {served[n]}, documented {documented[n]}" for n in served
                       if n in documented and documented[n] != served[n])
        self.check("docs/METRICS.md gives every family the type the worker declares", not wrong, str(wrong))
        stale = sorted(n for n in documented if n not in served)
        self.check("docs/METRICS.md documents no family the worker does not serve", not stale, str(stale))

    def check_dashboard(self, api, at, exported):
        with open(self.a.dashboard) as f:
            board = json.load(f)
        values = grafana_variables(board)
        targets = dashboard_targets(board)
        self.check("dashboard has query targets", len(targets) > 0, f"{len(targets)} targets")
        for title, ref, raw, legend in targets:
            name = f"panel '{title}' {ref}"
            missing = sorted(metric_names(raw) - exported)
            self.check(f"{name}: metrics exported by pkv-worker", not missing,
                       f"not exported: {missing}" if missing else ", ".join(sorted(metric_names(raw))) or "no pkv_ metric")
            try:
                expr = substitute(raw, values)
                result = api.query(expr, at)
            except Failure as e:
                self.check(f"{name}: query", False, f"{e}\n    expr: {raw}")
                continue
            if not self.check(f"{name}: returns series", len(result) > 0,
                              f"{len(result)} series, e.g. {result[0]['value'][1]}" if result
                              else f"no series\n    expr: {expr}"):
                continue
            wanted = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
            bad = sorted({l for s in result for l in wanted if l not in s["metric"]})
            if wanted:
                self.check(f"{name}: legend labels {sorted(wanted)} on every series", not bad,
                           f"missing {bad} in {[s['metric'] for s in result][:3]}" if bad else "")
        for p in board.get("panels") or []:
            if p.get("type") != "stat" or p.get("title") not in HEALTHY_GREEN_STATS:
                continue
            th = (p.get("fieldConfig") or {}).get("defaults", {}).get("thresholds") or {"steps": []}
            for t in p.get("targets") or []:
                name = f"stat '{p['title']}' {t.get('refId', '?')}: green for a healthy worker"
                try:
                    result = api.query(substitute(t["expr"], values), at)
                except Failure as e:
                    self.check(name, False, str(e))
                    continue
                if not result:
                    self.check(name, False, "no series")
                    continue
                value = float(result[0]["value"][1])
                colour = None  # Grafana: the last step whose value is null (the base) or <= the value
                for step in th["steps"]:
                    if step.get("value") is None or value >= step["value"]:
                        colour = step.get("color")
                self.check(name, colour == "green", f"value {value:g} -> {colour}")
        for v in (board.get("templating") or {}).get("list", []):
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            m = re.match(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$", q or "")
            if v.get("type") != "query" or not m:
                continue
            expr = f"count by ({m.group(2)}) ({substitute(m.group(1), values)})"
            try:
                result = api.query(expr, at)
            except Failure as e:
                self.check(f"variable ${v['name']}: {q}", False, str(e))
                continue
            found = sorted(s["metric"].get(m.group(2), "") for s in result if s["metric"].get(m.group(2)))
            self.check(f"variable ${v['name']}: {q}", bool(found), f"values {found}" if found else f"none ({expr})")

    def check_alerts(self, api, at, exported, groups):
        rules = [r for g in groups for r in g["rules"]]
        alerts = {r["name"]: r for r in rules if r.get("type") == "alerting"}
        self.check("Prometheus loaded every rule of the file", self.rule_count is None or len(rules) == self.rule_count,
                   f"{len(rules)} loaded, promtool found {self.rule_count}")
        self.check(f"the alerts are exactly the expected {len(EXPECTED_ALERTS)}", set(alerts) == EXPECTED_ALERTS,
                   f"unexpected {sorted(set(alerts) - EXPECTED_ALERTS)}, missing {sorted(EXPECTED_ALERTS - set(alerts))}")
        for name, r in sorted(alerts.items()):
            expr = r["query"]
            self.check(f"alert {name}: evaluated by Prometheus without error",
                       r.get("health") == "ok" and not r.get("lastError"),
                       f"health {r.get('health')} {r.get('lastError', '')}")
            self.check(f"alert {name}: for, severity, summary, description",
                       r.get("duration", 0) > 0 and r["labels"].get("severity") in ("info", "warning", "critical")
                       and r["annotations"].get("summary") and r["annotations"].get("description"),
                       f"for {r.get('duration')} s, labels {r.get('labels')}, annotations {sorted(r.get('annotations', {}))}")
            missing = sorted(metric_names(expr) - exported)
            self.check(f"alert {name}: metrics exported by pkv-worker", not missing,
                       f"not exported: {missing}" if missing else ", ".join(sorted(metric_names(expr))) or "up")
            try:
                whole = api.query(expr, at)
                self.check(f"alert {name}: expression evaluates", True, f"{len(whole)} series (firing condition)")
            except Failure as e:
                self.check(f"alert {name}: expression evaluates", False, f"{e}\n    expr: {expr}")
            m = TRAILING_COMPARISON.search(expr)
            if not self.check(f"alert {name}: ends in a comparison with a threshold", m is not None, expr):
                continue
            signal_expr = expr[:m.start()]
            try:
                result = api.query(signal_expr, at)
            except Failure as e:
                self.check(f"alert {name}: signal returns series", False, f"{e}\n    expr: {signal_expr}")
                continue
            self.check(f"alert {name}: signal returns series", len(result) > 0,
                       f"{len(result)} series, value {result[0]['value'][1]} vs `{m.group(0).strip()}`" if result
                       else f"no series\n    expr: {signal_expr}")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    source = os.path.dirname(os.path.dirname(here))
    chart = os.path.join(source, "helm", "persistentkv")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", required=True, help="built pkv-worker")
    ap.add_argument("--replay", required=True, help="built pkv-replay")
    ap.add_argument("--prometheus", default="prometheus")
    ap.add_argument("--promtool", default="promtool")
    ap.add_argument("--rules", default=os.path.join(chart, "rules", "persistentkv-alerts.yaml"))
    ap.add_argument("--dashboard", default=os.path.join(chart, "dashboards", "persistentkv.json"))
    ap.add_argument("--alerts-test", default=os.path.join(here, "alerts_test.yaml"))
    ap.add_argument("--metrics-doc", default=os.path.join(source, "docs", "METRICS.md"))
    ap.add_argument("--timeout", type=float, default=85, help="seconds for the whole test")
    a = ap.parse_args()
    a.source_dir = source
    for tool in ("prometheus", "promtool"):
        path = shutil.which(getattr(a, tool))
        if not path:
            print(f"FAIL {tool} not found: install Debian's prometheus package (scripts/setup.sh does)")
            return 1
        setattr(a, tool, path)
    for f in (a.worker, a.replay):
        if not os.access(f, os.X_OK):
            print(f"FAIL {f} is not an executable: build pkv-worker and pkv-replay first")
            return 1

    # SIGTERM/SIGINT unwind through the finally below, which stops every child.
    def on_signal(sig, frame):
        raise SystemExit(f"observability_test: signal {sig}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    t0 = time.monotonic()
    test = Test(a)
    deadline = Deadline(a.timeout)
    procs = Processes()
    tmp = tempfile.mkdtemp(prefix="pkv-observability-")
    try:
        test.run_promtool()
        test.run_live(procs, tmp, deadline)
    except Failure as e:
        test.check("live run", False, str(e))
        for name in ("worker.log", "prometheus.log", "replay.log"):
            text = tail(os.path.join(tmp, name), 20)
            if text:
                print(f"---- {name} (last lines) ----\n{text}")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    total = test.passed + len(test.failed)
    print(f"\nobservability_test: {test.passed} passed, {len(test.failed)} failed of {total} checks "
          f"in {time.monotonic() - t0:.1f} s")
    for name in test.failed:
        print(f"  - {name}")
    return 1 if test.failed else 0


if __name__ == "__main__":
    sys.exit(main())
