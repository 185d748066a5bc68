#!/usr/bin/env python3
"""Offline checks of the persistentkv Helm chart (run by scripts/helm_check.sh).

1. helm lint --strict with the default values and with every ci/*-values.yaml scenario.
2. helm template of each scenario, then checks on the rendered manifests: GPU request, gRPC
   probes on the right port (liveness on the engine heartbeat's service), named ports, hardened
   security contexts, selectors of the Services, ServiceMonitor, PDB and NetworkPolicy matching
   the pod labels, the worker flags, the
   PrometheusRule alerts (rules/persistentkv-alerts.yaml, embedded), the Grafana dashboard JSON and
   the helm test pod.
3. Bad values that must be rejected (schema or the chart's cross-field checks).
4. Every value in values.yaml is documented in README.md and declared in values.schema.json.
5. The Dockerfile the chart's image comes from: exact base image tags, the small CUDA base image
   for the runtime (the CUDA runtime is linked statically: checked in CMake and, when a built
   pkv-worker is given, with ldd), the commit passed as a build argument, pinned apt versions.

Prints one PASS/FAIL line per check and "helm_check: N passed, M failed"; exits 1 on a failure.
"""
import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

RELEASE = "pkvtest"
NAMESPACE = "pkv-ci"
ALERTS = {  # alert -> what its expression must contain (metric names of common/metrics.cc)
    "PersistentKVWorkerDown": ["up{", "== 0"],
    "PersistentKVPoolNearlyFull": ['pkv_kv_pool_pages{state="free"', "pkv_kv_pool_capacity_pages{"],
    "PersistentKVHighErrorRate": ['pkv_rpc_requests_total{code!="OK"', "pkv_rpc_requests_total{"],
    "PersistentKVStepLatencyHigh": ["histogram_quantile(0.99", "pkv_step_duration_seconds_bucket{"],
    "PersistentKVRequestLatencyHigh": ["histogram_quantile(0.99", "pkv_rpc_duration_seconds_bucket{",
                                       'method=~"Step|StepStream"'],
    "PersistentKVPredictionDrift": ["pkv_scheduler_prediction_error_ratio_sum{",
                                    "pkv_scheduler_prediction_error_ratio_count{"],
    "PersistentKVProcessStalled": ["pkv_process_stall_seconds_sum{"],
}
# Alerts whose trailing threshold the chart takes from metrics.prometheusRule.<value>.
ALERT_THRESHOLDS = {"PersistentKVPoolNearlyFull": "poolFreeRatioBelow",
                    "PersistentKVHighErrorRate": "errorRatioAbove",
                    "PersistentKVStepLatencyHigh": "stepLatencyP99SecondsAbove",
                    "PersistentKVRequestLatencyHigh": "requestLatencyP99SecondsAbove",
                    "PersistentKVPredictionDrift": "predictionErrorRatioAbove",
                    "PersistentKVProcessStalled": "processStallRatioAbove"}
RULES_FILE = "rules/persistentkv-alerts.yaml"  # plain Prometheus rules the PrometheusRule embeds
TRAILING_THRESHOLD = re.compile(r"(==|!=|>=|<=|>|<)\s*([-+]?[0-9.]+(?:[eE][-+]?\d+)?)\s*$")
STANDARD_LABELS = ("helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance",
                   "app.kubernetes.io/managed-by", "app.kubernetes.io/version")

# --set arguments that must make `helm template` fail: (args, why, what the error must name).
# A dotted value path matches both helm 4's "/a/b" and helm 3's "a.b" schema messages.
BAD_VALUES = [
    (["--set", "gpu.count=-1"], "negative GPU count", "gpu.count"),
    (["--set", "worker.model.dtype=fp32"], "unknown dtype", "worker.model.dtype"),
    (["--set-string", "worker.model.numLayers=many"], "string where an integer is expected",
     "worker.model.numLayers"),
    (["--set", "worker.model.numLayers=0"], "zero layers", "worker.model.numLayers"),
    (["--set", "worker.backend=tpu"], "unknown backend", "worker.backend"),
    (["--set", "image.tag=latest"], "image tag latest", "image.tag"),
    (["--set", "image.pullPolicy=Sometimes"], "unknown pull policy", "image.pullPolicy"),
    (["--set", "image.digest=sha256:abc"], "malformed digest", "image.digest"),
    (["--set", "ports.grpc=70000"], "port out of range", "ports.grpc"),
    (["--set", "replicaCount=-1"], "negative replicas", "replicaCount"),
    (["--set", "unknownTopLevelKey=1"], "unknown top-level key", "unknownTopLevelKey"),
    (["--set", "worker.unknownFlag=1"], "unknown worker key", "unknownFlag"),
    (["--set", "probes.startup.failureThreshold=0"], "zero start-up failure threshold",
     "probes.startup.failureThreshold"),
    (["--set", "worker.livenessStallSeconds=0"], "no liveness stall limit", "worker.livenessStallSeconds"),
    (["--set", "tls.reloadSeconds=0"], "TLS files never re-read", "tls.reloadSeconds"),
    (["--set", "metrics.prometheusRule.poolFreeRatioBelow=2"], "ratio above 1",
     "metrics.prometheusRule.poolFreeRatioBelow"),
    (["--set", "metrics.serviceMonitor.interval=often"], "malformed scrape interval",
     "metrics.serviceMonitor.interval"),
    (["--set", "service.type=ExternalName"], "unsupported Service type", "service.type"),
    (["--set", "gpu.resourceName=gpu"], "GPU resource without a domain", "gpu.resourceName"),
    (["--set", "calibration.key=a/b"], "ConfigMap key with a slash", "calibration.key"),
    (["--set", "worker.model.numQHeads=30"], "Hq not a multiple of Hkv (chart check)", "multiple of"),
    (["--set", "terminationGracePeriodSeconds=10"], "grace period shorter than the drain (chart check)",
     "must be at least"),
    (["--set", "tls.enabled=true"], "TLS without a Secret (chart check)", "tls.secretName"),
    (["--set", "worker.backend=cuda,gpu.count=0"], "cuda backend without a GPU (chart check)",
     "gpu.count >= 1"),
    (["--set", "worker.backend=cpu"], "cpu backend holding a requested GPU (chart check)",
     "would hold a GPU"),
    (["--set", "worker.kvPool.numPages=4096"], "two KV pool sizes: numPages and the default bytes (chart check)",
     "set exactly one of numPages, bytes and gpuMemoryFraction"),
    (["--set", "worker.kvPool.gpuMemoryFraction=0.9"], "two KV pool sizes: a fraction and bytes (chart check)",
     "set exactly one of numPages, bytes and gpuMemoryFraction"),
    (["--set", "worker.kvPool.bytes=0"], "no KV pool size (chart check)",
     "set exactly one of numPages, bytes and gpuMemoryFraction"),
    (["--set", "gpu.count=0,worker.kvPool.bytes=0,worker.kvPool.gpuMemoryFraction=0.5"],
     "GPU memory fraction on the CPU backend (chart check)", "sizes the CUDA backend's pool"),
    (["--set", "worker.kvPool.bytes=0,worker.kvPool.gpuMemoryFraction=1.5"], "fraction above 1",
     "worker.kvPool.gpuMemoryFraction"),
    (["--set", "worker.kvPool.bytes=-1"], "negative pool bytes", "worker.kvPool.bytes"),
    (["--set", "ports.metrics=50051"], "gRPC and metrics on one port (chart check)", "must differ"),
    (["--set", "metrics.enabled=false,metrics.serviceMonitor.enabled=true"],
     "ServiceMonitor without metrics (chart check)", "needs metrics.enabled"),
]


DASHBOARD_FILE = "dashboards/persistentkv.json"
# Stat panels of the dashboard: (value, colours its thresholds may give it). Healthy values must
# not be red, trouble must be red or amber. Every stat panel must be listed here.
STAT_COLOURS = {
    "Workers up / ready": [(0, {"red"}), (1, {"green"}), (8, {"green"})],
    "Decode throughput": [(0, {"blue"}), (50, {"green"}), (20000, {"green"})],
    "KV pool free ratio (min over pods)": [(0.0, {"red"}), (0.01, {"red"}), (0.10, {"orange", "yellow"}),
                                           (0.5, {"green"}), (1.0, {"green"})],
    "KV pool headroom (min over pods)": [(0, {"red"}), (100, {"red"}), (1000, {"orange", "yellow"}),
                                         (1e6, {"green"})],
    "RPC rate": [(0, {"blue"}), (1e4, {"blue"})],
}

# Worker flags that size the KV pool; the chart passes exactly one.
POOL_FLAGS = ("num_pages", "kv_pool_bytes", "gpu_memory_fraction")

# Rendered worker flags for values outside the ci/ scenarios: (--set arguments, what it shows,
# flag -> expected value, with None meaning the flag must be absent).
FLAG_VARIANTS = [
    ([], "defaults: a GPU pod requires its GPU and gets the pool bytes it asks for",
     {"backend": "cuda", "kv_pool_bytes": "34359738368", "num_pages": None, "gpu_memory_fraction": None}),
    (["--set", "gpu.count=0,worker.kvPool.bytes=2147483648"], "auto without a GPU request serves on the CPU",
     {"backend": "cpu", "kv_pool_bytes": "2147483648"}),
    (["--set", "gpu.count=0", "--set-string", "resources.limits.nvidia\\.com/gpu=1"],
     "auto with a GPU set directly in resources requires the GPU", {"backend": "cuda"}),
    (["--set", "worker.kvPool.bytes=0,worker.kvPool.numPages=4096"], "numPages alone",
     {"num_pages": "4096", "kv_pool_bytes": None, "gpu_memory_fraction": None}),
    (["--set", "worker.kvPool.bytes=0,worker.kvPool.gpuMemoryFraction=0.8"], "a share of free GPU memory",
     {"backend": "cuda", "gpu_memory_fraction": "0.8", "kv_pool_bytes": None, "num_pages": None}),
    (["--set", "worker.backend=cuda,worker.kvPool.bytes=1073741824"], "explicit cuda keeps explicit bytes",
     {"backend": "cuda", "kv_pool_bytes": "1073741824"}),
    (["--set", "worker.livenessStallSeconds=90"], "liveness stall limit", {"liveness_stall_s": "90"}),
    (["--set", "tls.enabled=true,tls.secretName=s,tls.reloadSeconds=5"], "TLS files re-read every 5 s",
     {"tls_reload_s": "5"}),
    ([], "no TLS, no TLS reload flag", {"tls_reload_s": None}),
]


def requests_gpu(values):
    """Whether the worker container asks for a GPU: gpu.count, or a GPU resource set directly."""
    if values["gpu"]["count"] > 0:
        return True
    res = values.get("resources") or {}
    names = [k for section in ("requests", "limits") for k in (res.get(section) or {})]
    return any(k == values["gpu"]["resourceName"] or k.startswith("nvidia.com/") for k in names)


def threshold_colour(thresholds, value):
    """The colour Grafana gives `value`: the last step whose value is null (the base) or <= it."""
    colour = None
    for step in thresholds["steps"]:
        if step.get("value") is None or value >= step["value"]:
            colour = step["color"]
    return colour


def pool_flag(pool):
    """(flag, value) the chart must pass for worker.kvPool (exactly one of its sizes is set)."""
    if pool["numPages"] > 0:
        return "num_pages", str(pool["numPages"])
    if pool["bytes"] > 0:
        return "kv_pool_bytes", str(pool["bytes"])
    return "gpu_memory_fraction", str(pool["gpuMemoryFraction"])


class Checker:
    def __init__(self, helm, chart):
        self.helm = helm
        self.chart = chart
        self.passed = 0
        self.failed = []
        self.notes = []
        self.worker_flags = set()  # flag names the chart passes pkv-worker, over all scenarios
        self.replay_flags = set()  # flag names of the helm test pod's pkv-replay command
        with open(os.path.join(chart, "Chart.yaml")) as f:
            self.chart_meta = yaml.safe_load(f)
        with open(os.path.join(chart, "values.yaml")) as f:
            self.defaults = yaml.safe_load(f)
        with open(os.path.join(chart, RULES_FILE)) as f:
            self.rules_file = yaml.safe_load(f)

    def check(self, name, ok, detail=""):
        if ok:
            self.passed += 1
            print(f"PASS {name}")
        else:
            self.failed.append(name)
            print(f"FAIL {name}" + (f": {detail}" if detail else ""))
        return ok

    def run_helm(self, *args):
        proc = subprocess.run([self.helm, *args], capture_output=True, text=True)
        return proc.returncode, proc.stdout, proc.stderr

    def template(self, extra):
        return self.run_helm("template", RELEASE, self.chart, "--namespace", NAMESPACE,
                             "--include-crds", *extra)

    # ---- scenarios -------------------------------------------------------------------------
    def scenarios(self):
        ci = os.path.join(self.chart, "ci")
        out = [("defaults", None)]
        for name in sorted(os.listdir(ci)):
            if name.endswith("-values.yaml"):
                out.append((name[: -len("-values.yaml")], os.path.join(ci, name)))
        return out

    def effective_values(self, values_file):
        values = copy.deepcopy(self.defaults)
        if values_file:
            with open(values_file) as f:
                merge(values, yaml.safe_load(f) or {})
        return values

    def run_scenarios(self):
        scenarios = self.scenarios()
        self.check("ci/ has scenarios (default, cpu-only, monitoring, tls, shared-memory)",
                   {"default", "cpu-only", "monitoring", "tls", "shared-memory"} <= {n for n, _ in scenarios},
                   str([n for n, _ in scenarios]))
        for name, values_file in scenarios:
            extra = ["-f", values_file] if values_file else []
            rc, out, err = self.run_helm("lint", "--strict", self.chart, *extra)
            self.check(f"[{name}] helm lint --strict", rc == 0, (out + err).strip()[-800:])
            rc, out, err = self.template(extra)
            if not self.check(f"[{name}] helm template", rc == 0, err.strip()[-800:]):
                continue
            docs = [d for d in yaml.safe_load_all(out) if d]
            self.check_manifests(name, docs, self.effective_values(values_file))

    # ---- rendered manifests ----------------------------------------------------------------
    def check_manifests(self, sc, docs, values):
        by_kind = {}
        for d in docs:
            by_kind.setdefault(d["kind"], []).append(d)
        c = lambda what, ok, detail="": self.check(f"[{sc}] {what}", ok, detail)

        missing = [f'{d["kind"]}/{d["metadata"]["name"]}' for d in docs
                   if any(l not in (d["metadata"].get("labels") or {}) for l in STANDARD_LABELS)]
        c("every resource carries the standard labels", not missing, str(missing))
        wrong_ns = [d["metadata"]["name"] for d in docs if d["metadata"].get("namespace") != NAMESPACE]
        c("every resource is namespaced to the release", not wrong_ns, str(wrong_ns))

        deps = by_kind.get("Deployment", [])
        if not c("exactly one Deployment", len(deps) == 1, str(len(deps))):
            return
        dep = deps[0]
        pod = dep["spec"]["template"]
        pod_labels = pod["metadata"]["labels"]
        spec = pod["spec"]
        c("no StatefulSet", "StatefulSet" not in by_kind)
        c("Deployment selector matches pod labels",
          subset(dep["spec"]["selector"]["matchLabels"], pod_labels))
        c("replicas follow replicaCount", dep["spec"]["replicas"] == values["replicaCount"])
        containers = spec["containers"]
        worker = next((x for x in containers if x["name"] == "worker"), None)
        if not c("worker container present", worker is not None):
            return

        # Image: never latest; default tag = appVersion.
        image = worker["image"]
        tag = image.rsplit(":", 1)[1] if "@" not in image else None
        c("image tag is not latest", tag != "latest" and not image.endswith(":latest"), image)
        if not values["image"]["tag"] and not values["image"]["digest"]:
            c("default image tag is the chart appVersion",
              tag == str(self.chart_meta["appVersion"]), image)
        if values["image"]["digest"]:
            c("digest pins the image", image.endswith("@" + values["image"]["digest"]), image)

        # GPU request.
        gpu = values["gpu"]["count"]
        res = worker.get("resources", {})
        rname = values["gpu"]["resourceName"]
        if gpu > 0:
            c(f"GPU request and limit {rname}={gpu}",
              res.get("limits", {}).get(rname) == gpu and res.get("requests", {}).get(rname) == gpu,
              json.dumps(res))
        else:
            c("no GPU resource when gpu.count=0", "gpu" not in json.dumps(res), json.dumps(res))
            c("CPU backend when gpu.count=0", "--backend=cpu" in worker["args"], str(worker["args"]))
        c("memory limit set", "memory" in res.get("limits", {}), json.dumps(res))
        rc = values["runtimeClassName"]
        c("runtimeClassName follows the value", spec.get("runtimeClassName", "") == rc)
        for key in ("nodeSelector", "tolerations", "affinity"):
            if values[key]:
                c(f"{key} rendered", spec.get(key) == values[key])

        # Ports: named, unique, the gRPC and metrics ones present.
        ports = worker.get("ports", [])
        names = [p.get("name") for p in ports]
        c("every container port is named", all(names) and len(set(names)) == len(names), str(names))
        cport = {p["name"]: p["containerPort"] for p in ports}
        c("gRPC port named grpc", cport.get("grpc") == values["ports"]["grpc"], str(cport))
        if values["metrics"]["enabled"]:
            c("metrics port named metrics", cport.get("metrics") == values["ports"]["metrics"], str(cport))

        # Flags.
        args = worker["args"]
        flags = {}
        for a in args:
            m = re.match(r"^--([a-z0-9_]+)=(.*)$", a)
            if m:
                flags.setdefault(m.group(1), []).append(m.group(2))
        c("every flag is --name=value", all(re.match(r"^--[a-z0-9_]+=", a) for a in args), str(args))
        c("no flag repeated", all(len(v) == 1 for v in flags.values()),
          str({k: v for k, v in flags.items() if len(v) > 1}))
        self.worker_flags.update(flags)
        flag = lambda k: (flags.get(k) or [None])[0]
        c("--listen on the gRPC port", flag("listen") == f"0.0.0.0:{values['ports']['grpc']}", str(flag("listen")))
        m = values["worker"]["model"]
        c("model shape flags", [flag(k) for k in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim",
                                                   "page_size", "dtype")]
          == [str(m[k]) for k in ("numLayers", "numQHeads", "numKvHeads", "headDim", "pageSize")] + [m["dtype"]])
        # Backend: a GPU request makes the worker require one (--backend=cuda), never auto.
        wants_gpu = requests_gpu(values)
        backend = values["worker"]["backend"]
        expected = backend if backend != "auto" else ("cuda" if wants_gpu else "cpu")
        c(f"--backend={expected} (worker.backend={backend}, GPU requested: {wants_gpu})",
          flag("backend") == expected, str(flag("backend")))
        # KV pool: exactly one size flag, the one the values set, on every backend.
        pool = values["worker"]["kvPool"]
        sized_by = [k for k in POOL_FLAGS if k in flags]
        c("exactly one KV pool size flag", len(sized_by) == 1, str(sized_by))
        want = pool_flag(pool)
        c(f"--{want[0]}={want[1]} from worker.kvPool", flag(want[0]) == want[1], str(sized_by))
        # Shared memory: the region limit, and a memory-backed /dev/shm that extra containers can mount.
        shm = values["sharedMemory"]
        c("--shared_memory_max_bytes from sharedMemory.maxBytes",
          flag("shared_memory_max_bytes") == str(int(shm["maxBytes"])), str(flag("shared_memory_max_bytes")))
        dshm = [v for v in spec.get("volumes", []) if v["name"] == "dshm"]
        mounts = [m for m in worker.get("volumeMounts", []) if m["name"] == "dshm"]
        if shm["sizeLimit"]:
            c("a memory-backed /dev/shm of sharedMemory.sizeLimit in the worker",
              len(dshm) == 1 and dshm[0].get("emptyDir", {}).get("medium") == "Memory"
              and dshm[0]["emptyDir"].get("sizeLimit") == shm["sizeLimit"]
              and [m["mountPath"] for m in mounts] == ["/dev/shm"], json.dumps(dshm) + json.dumps(mounts))
        else:
            c("no /dev/shm volume without sharedMemory.sizeLimit", not dshm and not mounts, json.dumps(dshm))
        c("extraContainers next to the worker",
          [x["name"] for x in containers if x["name"] != "worker"] == [x["name"] for x in values["extraContainers"]],
          str([x["name"] for x in containers]))
        if values["metrics"]["enabled"]:
            c("--metrics_listen on the metrics port",
              flag("metrics_listen") == f"0.0.0.0:{values['ports']['metrics']}", str(flag("metrics_listen")))

        # Probes: native gRPC, on the gRPC port (or the plaintext health port with TLS).
        probe_port = values["tls"]["healthPort"] if values["tls"]["enabled"] else values["ports"]["grpc"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = worker.get(kind)
            ok = (p is not None and set(p) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}
                  and p["grpc"].get("port") == probe_port and probe_port in cport.values())
            c(f"{kind} is a gRPC probe on port {probe_port}", ok, json.dumps(p))
        sp = worker.get("startupProbe") or {}
        budget = sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
        c("startup probe allows >= 5 minutes (calibration)", budget >= 300, str(budget))
        # Readiness and start-up ask probes.service; liveness asks the engine heartbeat's own service,
        # which stays SERVING through a drain.
        for kind in ("startupProbe", "readinessProbe"):
            p = worker.get(kind) or {"grpc": {}}
            c(f"{kind} asks probes.service", p["grpc"].get("service", "") == values["probes"]["service"],
              json.dumps(p))
        lp = worker.get("livenessProbe") or {"grpc": {}}
        c("livenessProbe asks probes.liveness.service",
          lp["grpc"].get("service", "") == values["probes"]["liveness"]["service"], json.dumps(lp))
        if values["probes"]["liveness"]["service"] == self.defaults["probes"]["liveness"]["service"]:
            c("livenessProbe asks the engine heartbeat (pkv.v1.Liveness), not readiness",
              lp["grpc"].get("service") == "pkv.v1.Liveness", json.dumps(lp))
        c("--liveness_stall_s from worker.livenessStallSeconds",
          flag("liveness_stall_s") is not None
          and float(flag("liveness_stall_s")) == float(values["worker"]["livenessStallSeconds"]),
          str(flag("liveness_stall_s")))

        # Shutdown: preStop + grace period >= preStop + drain.
        pre = (worker.get("lifecycle") or {}).get("preStop") or {}
        c("preStop hook present", bool(pre), json.dumps(pre))
        drain = float(flag("shutdown_grace_s") or "0")
        grace = spec.get("terminationGracePeriodSeconds", 30)
        c("terminationGracePeriodSeconds covers preStop + drain",
          grace >= values["lifecycle"]["preStopSleepSeconds"] + drain, f"{grace} vs {drain}")

        # Security contexts.
        self.check_security(c, "worker", spec, worker)
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in worker.get("volumeMounts", [])}
        c("writable /tmp emptyDir for the read-only root", mounts.get("/tmp") in vols and
          "emptyDir" in vols.get(mounts.get("/tmp"), {}))

        # Calibration profile.
        cal = values["calibration"]
        if cal["profile"] or cal["existingConfigMap"]:
            path = f"{cal['mountPath']}/{cal['key']}"
            c("--calibration_profile points into the mounted ConfigMap",
              flag("calibration_profile") == path and mounts.get(cal["mountPath"]) == "calibration"
              and "configMap" in vols.get("calibration", {}), str(flag("calibration_profile")))
            if cal["profile"]:
                cms = [d for d in by_kind.get("ConfigMap", [])
                       if d["metadata"]["name"] == vols["calibration"]["configMap"]["name"]]
                c("calibration ConfigMap rendered with the profile",
                  len(cms) == 1 and cms[0]["data"].get(cal["key"], "").strip() == cal["profile"].strip())
                c("pods roll when the profile changes",
                  "checksum/calibration" in (pod["metadata"].get("annotations") or {}))
        elif not cal["imageProfile"]:
            c("no --calibration_profile without a profile", "calibration_profile" not in flags)

        # TLS.
        if values["tls"]["enabled"]:
            tv = next((v for v in vols.values() if "secret" in v), None)
            c("TLS Secret mounted read-only",
              tv is not None and tv["secret"]["secretName"] == values["tls"]["secretName"]
              and mounts.get(values["tls"]["mountPath"]) == tv["name"])
            c("TLS flags point into the mount",
              all((flag(k) or "").startswith(values["tls"]["mountPath"] + "/")
                  for k in ("tls_cert_file", "tls_key_file")))
            c("plaintext health listener for the probes",
              flag("health_listen") == f"0.0.0.0:{values['tls']['healthPort']}")
            c("--tls_reload_s from tls.reloadSeconds", flag("tls_reload_s") == str(values["tls"]["reloadSeconds"]),
              str(flag("tls_reload_s")))

        # Services.
        services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
        main = [s for s in services.values() if s["spec"].get("clusterIP") != "None"]
        headless = [s for s in services.values() if s["spec"].get("clusterIP") == "None"]
        c("one load-balanced Service", len(main) == 1, str(list(services)))
        if values["headlessService"]["enabled"]:
            c("one headless Service", len(headless) == 1)
        for s in services.values():
            nm = s["metadata"]["name"]
            c(f"Service {nm} selects the worker pods", subset(s["spec"]["selector"], pod_labels) and
              s["spec"]["selector"].get("app.kubernetes.io/component") == "worker")
            sports = s["spec"]["ports"]
            c(f"Service {nm} ports named and targeting named container ports",
              all(p.get("name") and p.get("targetPort") in cport for p in sports), json.dumps(sports))
            c(f"Service {nm} exposes grpc", any(p["name"] == "grpc" and p["port"] == values["ports"]["grpc"]
                                                 for p in sports))
        if headless:
            c("headless Service publishes only ready workers",
              not headless[0]["spec"].get("publishNotReadyAddresses", False))

        # PDB.
        pdbs = by_kind.get("PodDisruptionBudget", [])
        if values["podDisruptionBudget"]["enabled"]:
            c("PodDisruptionBudget selects the worker pods",
              len(pdbs) == 1 and subset(pdbs[0]["spec"]["selector"]["matchLabels"], pod_labels))
            c("PodDisruptionBudget sets exactly one of minAvailable/maxUnavailable",
              len(pdbs) == 1 and len({"minAvailable", "maxUnavailable"} & set(pdbs[0]["spec"])) == 1)

        # NetworkPolicy.
        nps = by_kind.get("NetworkPolicy", [])
        if values["networkPolicy"]["enabled"]:
            ok = len(nps) == 1 and subset(nps[0]["spec"]["podSelector"]["matchLabels"], pod_labels)
            c("NetworkPolicy selects the worker pods", ok)
            if ok:
                allowed = {p["port"] for r in nps[0]["spec"]["ingress"] for p in r.get("ports", [])}
                c("NetworkPolicy admits the named ports", allowed <= set(cport) and "grpc" in allowed, str(allowed))

        # ServiceMonitor.
        sms = by_kind.get("ServiceMonitor", [])
        if values["metrics"]["serviceMonitor"]["enabled"]:
            if c("ServiceMonitor rendered", len(sms) == 1):
                sm = sms[0]["spec"]
                chosen = [s for s in services.values() if selects(sm["selector"], s["metadata"]["labels"])]
                c("ServiceMonitor selects exactly the load-balanced Service",
                  [s["metadata"]["name"] for s in chosen] == [main[0]["metadata"]["name"]],
                  str([s["metadata"]["name"] for s in chosen]))
                mports = {p["name"] for p in main[0]["spec"]["ports"]}
                c("ServiceMonitor endpoint port exists on the Service",
                  all(e.get("port") in mports for e in sm["endpoints"]))
                c("ServiceMonitor watches the release namespace",
                  NAMESPACE in sm.get("namespaceSelector", {}).get("matchNames", []))
                extra = values["metrics"]["serviceMonitor"]["labels"]
                c("ServiceMonitor carries its selector labels", subset(extra, sms[0]["metadata"]["labels"]))
        else:
            c("no ServiceMonitor when disabled", not sms)

        # PrometheusRule.
        prs = by_kind.get("PrometheusRule", [])
        if values["metrics"]["prometheusRule"]["enabled"]:
            if c("PrometheusRule rendered", len(prs) == 1):
                rules = [r for g in prs[0]["spec"]["groups"] for r in g["rules"]]
                byname = {r.get("alert"): r for r in rules}
                for alert, needles in ALERTS.items():
                    r = byname.get(alert)
                    ok = (r is not None and all(x in r["expr"] for x in needles) and promql_balanced(r["expr"])
                          and "{{" not in r["expr"] and re.match(r"^\d+[smh]$", str(r.get("for", "")))
                          and r["labels"].get("severity") and r["annotations"].get("summary"))
                    c(f"alert {alert}", bool(ok), json.dumps(r))
                fullname = dep["metadata"]["name"]
                c("alerts select the ServiceMonitor's job",
                  all(f'job="{fullname}"' in r["expr"] for r in byname.values() if r))
                # The PrometheusRule is rules/persistentkv-alerts.yaml with only the job selector,
                # the thresholds, `for` and labels set per release.
                pr = values["metrics"]["prometheusRule"]
                diffs = []
                for fr in (r for g in self.rules_file["groups"] for r in g["rules"] if r.get("alert")):
                    got = byname.get(fr["alert"])
                    want = fr["expr"].replace('job="persistentkv"', f'job="{fullname}",namespace="{NAMESPACE}"')
                    if fr["alert"] in ALERT_THRESHOLDS:
                        want = TRAILING_THRESHOLD.sub(lambda m: f"{m.group(1)} {pr[ALERT_THRESHOLDS[fr['alert']]]}", want)
                    if got is None or got["expr"] != want or got.get("for") != f"{pr['forMinutes']}m":
                        diffs.append(fr["alert"])
                c(f"PrometheusRule embeds {RULES_FILE} (selector, thresholds and for: from values)", not diffs,
                  str(diffs))
        else:
            c("no PrometheusRule when disabled", not prs)

        # Grafana dashboard.
        dash = [d for d in by_kind.get("ConfigMap", []) if d["metadata"]["name"].endswith("-dashboard")]
        if values["metrics"]["grafanaDashboard"]["enabled"]:
            if c("dashboard ConfigMap rendered with grafana_dashboard=\"1\"",
                 len(dash) == 1 and dash[0]["metadata"]["labels"].get("grafana_dashboard") == "1"):
                try:
                    board = json.loads(next(iter(dash[0]["data"].values())))
                except ValueError as e:
                    board = None
                    c("dashboard JSON parses", False, str(e))
                if board is not None:
                    exprs = [t.get("expr", "") for p in board.get("panels", []) for t in p.get("targets", [])]
                    c("dashboard JSON has a title, uid and query panels",
                      board.get("title") and board.get("uid") and exprs and all(exprs))
                    for metric in ("pkv_kv_pool_pages", "pkv_kv_pool_capacity_pages", "pkv_rpc_requests_total",
                                   "pkv_step_duration_seconds_bucket", "pkv_scheduler_prediction_error_ratio",
                                   "pkv_rpc_duration_seconds_bucket", "pkv_rpc_queue_seconds_bucket",
                                   "pkv_engine_heartbeat_age_seconds", "pkv_drain_refusals_total",
                                   "process_resident_memory_bytes"):
                        c(f"dashboard plots {metric}", any(metric in e for e in exprs))
                    # Pool states are disjoint parts; the capacity is its own family.
                    c('dashboard selects no pkv_kv_pool_* state="total"', not any('"total"' in e for e in exprs))
        else:
            c("no dashboard when disabled", not dash)

        # helm test pod.
        tests = [d for d in by_kind.get("Pod", [])
                 if (d["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"]
        if values["tests"]["enabled"]:
            if c("helm test pod rendered", len(tests) == 1):
                t = tests[0]
                tc = t["spec"]["containers"][0]
                argv = tc.get("command", []) + tc.get("args", [])
                cmd = " ".join(argv)
                self.replay_flags.update(re.findall(r"^--([a-z0-9_]+)", a)[0] for a in argv[1:]
                                         if re.match(r"^--[a-z0-9_]+", a))
                svc = main[0]["metadata"]["name"] if main else "?"
                c("helm test pod calls Describe through the Service",
                  "--describe_only" in cmd and f"--target={svc}.{NAMESPACE}.svc:{values['ports']['grpc']}" in cmd, cmd)
                c("helm test pod never restarts", t["spec"].get("restartPolicy") == "Never")
                self.check_security(c, "test pod", t["spec"], tc)
                if values["networkPolicy"]["enabled"] and values["networkPolicy"]["grpcFrom"] and nps:
                    peers = [p for r in nps[0]["spec"]["ingress"] for p in r.get("from", [])]
                    c("NetworkPolicy admits the helm test pod",
                      any(subset(p.get("podSelector", {}).get("matchLabels", {"x": "y"}), t["metadata"]["labels"])
                          for p in peers))

    def check_security(self, c, who, pod_spec, container):
        psc = pod_spec.get("securityContext") or {}
        sc = container.get("securityContext") or {}
        c(f"{who}: runAsNonRoot", psc.get("runAsNonRoot") is True and sc.get("runAsNonRoot", True) is True)
        c(f"{who}: non-zero runAsUser", (sc.get("runAsUser") or psc.get("runAsUser") or 0) > 0)
        c(f"{who}: readOnlyRootFilesystem", sc.get("readOnlyRootFilesystem") is True)
        c(f"{who}: allowPrivilegeEscalation false", sc.get("allowPrivilegeEscalation") is False)
        c(f"{who}: drops ALL capabilities", "ALL" in (sc.get("capabilities") or {}).get("drop", []))
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        c(f"{who}: seccomp RuntimeDefault", seccomp == "RuntimeDefault")

    # ---- bad values ------------------------------------------------------------------------
    def run_bad_values(self):
        for args, why, names in BAD_VALUES:
            rc, _, err = self.template(args)
            named = names in err or "/" + names.replace(".", "/") in err
            self.check(f"rejects {' '.join(args[1:])} ({why})", rc != 0 and named,
                       "rendered without error" if rc == 0 else err.strip()[-300:])

    # ---- worker flags of single-value variants ---------------------------------------------
    def run_flag_variants(self):
        for args, what, want in FLAG_VARIANTS:
            name = f"flags: {what}" + (f" ({' '.join(args[1::2])})" if args else "")
            rc, out, err = self.template([*args, "-s", "templates/deployment.yaml"])
            if not self.check(f"{name}: renders", rc == 0, err.strip()[-300:]):
                continue
            dep = next(d for d in yaml.safe_load_all(out) if d)
            worker = next(x for x in dep["spec"]["template"]["spec"]["containers"] if x["name"] == "worker")
            flags = dict(re.match(r"^--([a-z0-9_]+)=(.*)$", a).groups() for a in worker["args"]
                         if re.match(r"^--[a-z0-9_]+=", a))
            got = {k: flags.get(k) for k in want}
            self.check(name, got == want, f"got {got}")

    # ---- dashboard stat panels ------------------------------------------------------------
    def run_dashboard_thresholds(self):
        with open(os.path.join(self.chart, DASHBOARD_FILE)) as f:
            board = json.load(f)
        stats = [p for p in board["panels"] if p["type"] == "stat"]
        titles = [p["title"] for p in stats]
        self.check("every stat panel has colour expectations in check_chart.py",
                   set(titles) == set(STAT_COLOURS), f"panels {titles}")
        for p in stats:
            name = f"dashboard stat '{p['title']}'"
            defaults = p.get("fieldConfig", {}).get("defaults", {})
            th = defaults.get("thresholds") or {}
            st = th.get("steps") or []
            values = [x.get("value") for x in st]
            ok = (th.get("mode") == "absolute" and st and values[0] is None and all(x.get("color") for x in st)
                  and values[1:] == sorted(values[1:]) and defaults.get("color", {}).get("mode") == "thresholds")
            if not self.check(f"{name}: absolute thresholds, colour by thresholds", ok, json.dumps(th)):
                continue
            wrong = [(v, threshold_colour(th, v)) for v, want in STAT_COLOURS.get(p["title"], [])
                     if threshold_colour(th, v) not in want]
            self.check(f"{name}: healthy values are not red, trouble is red or amber", not wrong,
                       f"(value, colour) {wrong}")
        # The pool's red boundary is the PersistentKVPoolNearlyFull default.
        free = next((p for p in stats if p["title"].startswith("KV pool free ratio")), None)
        if free:
            steps = free["fieldConfig"]["defaults"]["thresholds"]["steps"]
            first_non_red = next((x["value"] for x in steps if x["color"] != "red"), None)
            limit = self.defaults["metrics"]["prometheusRule"]["poolFreeRatioBelow"]
            self.check("dashboard pool free ratio turns red where PersistentKVPoolNearlyFull fires (default)",
                       first_non_red == limit, f"{first_non_red} vs {limit}")

    # ---- other ----------------------------------------------------------------------------
    def run_misc(self):
        # Standalone users of the rules file get the chart's default thresholds.
        pr = self.defaults["metrics"]["prometheusRule"]
        wrong = []
        for r in (r for g in self.rules_file["groups"] for r in g["rules"]):
            if r.get("alert") in ALERT_THRESHOLDS:
                m = TRAILING_THRESHOLD.search(r["expr"])
                if not m or float(m.group(2)) != float(pr[ALERT_THRESHOLDS[r["alert"]]]):
                    wrong.append(r["alert"])
        self.check(f"{RULES_FILE} thresholds equal the values.yaml defaults", not wrong, str(wrong))
        rc, out, err = self.template(["--kube-version", "1.28.0", "-s", "templates/deployment.yaml"])
        ok = rc == 0 and '"/bin/sleep"' in out
        self.check("Kubernetes 1.28: preStop falls back to exec sleep", ok, err.strip()[-300:])
        rc, out, err = self.run_helm("template", RELEASE, self.chart, "--kube-version", "1.26.0")
        self.check("Kubernetes 1.26 (no GA gRPC probes) is refused by kubeVersion", rc != 0)

        with open(os.path.join(self.chart, "README.md")) as f:
            readme = f.read()
        table = readme.split("\n## Values\n", 1)[-1]
        documented = set(re.findall(r"^\|\s*`([^`]+)`\s*\|", table, re.M))
        leaves = set(leaf_paths(self.defaults))
        undocumented = sorted(leaves - documented)
        self.check("every value in values.yaml is documented in README.md", not undocumented,
                   str(undocumented))
        stale = sorted(p for p in documented - leaves
                       if not any(l.startswith(p + ".") for l in leaves))
        self.check("README.md documents no value that values.yaml lacks", not stale, str(stale))

        sys.dont_write_bytecode = True  # keep tests/helm free of __pycache__
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import values_table
        fresh = values_table.table(os.path.join(self.chart, "values.yaml"))
        self.check("README.md values table matches values.yaml (tests/helm/values_table.py)",
                   readme.endswith(fresh))

        with open(os.path.join(self.chart, "values.schema.json")) as f:
            schema = json.load(f)
        unknown = [p for p in leaves if not schema_has(schema, p.split("."))]
        self.check("every value is declared in values.schema.json", not unknown, str(unknown))

        with tempfile.TemporaryDirectory() as tmp:
            rc, out, err = self.run_helm("package", self.chart, "-d", tmp)
            self.check("helm package", rc == 0, err.strip()[-300:])


    # ---- the image ------------------------------------------------------------------------
    def run_dockerfile(self, worker_binary):
        root = os.path.normpath(os.path.join(self.chart, "..", ".."))
        with open(os.path.join(root, "Dockerfile")) as f:
            text = f.read()
        joined = re.sub(r"\\\n", " ", text)
        args = dict(re.findall(r"^ARG (\w+)=(\S*)$", joined, re.M))
        expand = lambda v: re.sub(r"\$\{(\w+)\}", lambda m: expand(args.get(m.group(1), "")), v)
        froms = [(expand(m.group(1)), m.group(2)) for m in re.finditer(r"^FROM (\S+) AS (\w+)", joined, re.M)]
        stages = {stage: image for image, stage in froms}
        exact = re.compile(r"^nvidia/cuda:\d+\.\d+\.\d+-(devel|runtime|base)-ubuntu\d+\.\d+(@sha256:[0-9a-f]{64})?$")
        self.check("Dockerfile: base images are exact nvidia/cuda tags", froms and all(exact.match(i) for i, _ in froms),
                   str(froms))
        self.check("Dockerfile: the runtime stage uses the small CUDA base image",
                   "-base-" in stages.get("runtime", ""), str(stages))
        self.check("Dockerfile: PKV_COMMIT build argument reaches CMake",
                   re.search(r"^ARG PKV_COMMIT", joined, re.M) is not None
                   and '-DPKV_COMMIT="${PKV_COMMIT}"' in joined)
        with open(os.path.join(root, "service", "CMakeLists.txt")) as f:
            service_cmake = f.read()
        self.check("service/CMakeLists.txt: PKV_COMMIT overrides git rev-parse",
                   re.search(r'set\(PKV_COMMIT "" CACHE STRING', service_cmake) is not None)
        self.check("Dockerfile: the runtime stage installs the build stage's package versions",
                   "${Package}=${Version}" in joined and "runtime-packages.txt" in joined)
        dynamic = []
        for folder, subdirs, files in os.walk(root):
            if folder == root:  # not build trees, .git or fetched headers
                subdirs[:] = [d for d in subdirs if not d.startswith(("build", "."))]
            for name in files:
                if name == "CMakeLists.txt" or name.endswith(".cmake"):
                    with open(os.path.join(folder, name)) as f:
                        if re.search(r"CUDA::cudart(?!_static)\b", f.read()):
                            dynamic.append(os.path.relpath(os.path.join(folder, name), root))
        self.check("CMake links the CUDA runtime statically only (CUDA::cudart_static)", not dynamic, str(dynamic))
        if worker_binary:
            proc = subprocess.run(["ldd", worker_binary], capture_output=True, text=True)
            libs = re.findall(r"^\s*(\S+)", proc.stdout, re.M)
            cuda = [l for l in libs if re.match(r"lib(cudart|cuda|cublas|nvrtc)", l)]
            self.check(f"{worker_binary} needs no CUDA shared library (ldd)", proc.returncode == 0 and not cuda,
                       str(cuda) if cuda else proc.stderr[-200:])

    # ---- flags against built binaries ------------------------------------------------------
    def run_flags(self, binaries, strict):
        """Flags the chart renders that a built pkv-worker / pkv-replay does not define. Notes
        only (the binaries may be older than the chart) unless strict."""
        for name, wanted in (("pkv-worker", self.worker_flags), ("pkv-replay", self.replay_flags)):
            binary = binaries.get(name)
            if not binary:
                self.notes.append(f"{name}: no built binary found; chart flags not compared")
                continue
            proc = subprocess.run([binary, "--helpfull"], capture_output=True, text=True, timeout=30)
            defined = set(re.findall(r"^\s+--([a-z0-9_]+) \(", proc.stdout + proc.stderr, re.M))
            if not defined:
                self.notes.append(f"{name}: {binary} --helpfull listed no flags")
                continue
            missing = sorted(wanted - defined)
            if strict:
                self.check(f"{name} ({binary}) defines every flag the chart passes", not missing, str(missing))
            elif missing:
                self.notes.append(f"{name} ({binary}) lacks flags the chart passes: "
                                  + " ".join("--" + m for m in missing))
            else:
                self.notes.append(f"{name} ({binary}) defines every flag the chart passes")


def merge(base, over):
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v


def subset(small, big):
    return all(big.get(k) == v for k, v in (small or {}).items())


def selects(selector, labels):
    """Whether a LabelSelector (matchLabels + matchExpressions) selects `labels`."""
    if not subset(selector.get("matchLabels", {}), labels):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, vals = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and labels.get(key) in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def promql_balanced(expr):
    depth = {"(": 0, "{": 0, "[": 0}
    pairs = {")": "(", "}": "{", "]": "["}
    in_str = False
    for ch in expr:
        if ch == '"':
            in_str = not in_str
        elif in_str:
            continue
        elif ch in depth:
            depth[ch] += 1
        elif ch in pairs:
            depth[pairs[ch]] -= 1
            if depth[pairs[ch]] < 0:
                return False
    return not in_str and all(v == 0 for v in depth.values())


def leaf_paths(values, prefix=""):
    """Documented paths: scalars and lists are leaves; non-empty maps recurse, except maps of
    Kubernetes objects that are documented as a whole."""
    whole = {"resources", "podSecurityContext", "securityContext", "updateStrategy",
             "tests.resources", "metrics.grafanaDashboard.labels"}
    for k, v in values.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and path not in whole:
            yield from leaf_paths(v, path + ".")
        else:
            yield path


def schema_has(schema, parts):
    node = schema
    for p in parts:
        props = node.get("properties")
        if props is None:
            return node.get("type") == "object" and node.get("additionalProperties", True) is not False
        if p not in props:
            return False
        node = props[p]
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--helm", required=True)
    ap.add_argument("--chart", required=True)
    ap.add_argument("--worker", default="", help="built pkv-worker to compare flags with")
    ap.add_argument("--replay", default="", help="built pkv-replay to compare flags with")
    ap.add_argument("--strict-flags", action="store_true",
                    help="count flags the binaries lack as failures (default: notes)")
    a = ap.parse_args()
    checker = Checker(a.helm, a.chart)
    checker.run_scenarios()
    checker.run_bad_values()
    checker.run_flag_variants()
    checker.run_dashboard_thresholds()
    checker.run_misc()
    checker.run_dockerfile(a.worker)
    checker.run_flags({"pkv-worker": a.worker, "pkv-replay": a.replay}, a.strict_flags)
    for note in checker.notes:
        print(f"NOTE {note}")
    total = checker.passed + len(checker.failed)
    if checker.failed:
        print(f"\nhelm_check: FAILED {len(checker.failed)} of {total} checks:")
        for name in checker.failed:
            print(f"  - {name}")
    else:
        print(f"\nhelm_check: all {total} checks passed")
    print(f"helm_check: {checker.passed} passed, {len(checker.failed)} failed")
    return 1 if checker.failed else 0


if __name__ == "__main__":
    sys.exit(main())
