{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "persistentkv.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: release-chart, unless the release name already contains the chart name. Truncated to
54 characters so that suffixed names ("-headless", "-dashboard") stay within 63.
*/}}
{{- define "persistentkv.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
chart label value: name-version.
*/}}
{{- define "persistentkv.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: stable for the life of a release (Deployment selectors are immutable).
*/}}
{{- define "persistentkv.selectorLabels" -}}
app.kubernetes.io/name: {{ include "persistentkv.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Standard labels on every resource.
*/}}
{{- define "persistentkv.labels" -}}
helm.sh/chart: {{ include "persistentkv.chart" . }}
{{ include "persistentkv.selectorLabels" . }}
app.kubernetes.io/version: {{ include "persistentkv.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: persistentkv
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels of the worker pods and of what selects them (Services, ServiceMonitor, PDB, policy).
*/}}
{{- define "persistentkv.workerSelectorLabels" -}}
{{ include "persistentkv.selectorLabels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "persistentkv.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "persistentkv.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image tag: the tag value, else the chart appVersion (never "latest").
*/}}
{{- define "persistentkv.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/*
Image reference: repository@digest when a digest is set, else repository:tag.
*/}}
{{- define "persistentkv.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "persistentkv.imageTag" .) }}
{{- end }}
{{- end }}

{{/*
Name of the ConfigMap holding the calibration profile, or "" when none is mounted.
*/}}
{{- define "persistentkv.calibrationConfigMap" -}}
{{- if .Values.calibration.profile }}
{{- printf "%s-calibration" (include "persistentkv.fullname" .) }}
{{- else if .Values.calibration.existingConfigMap }}
{{- .Values.calibration.existingConfigMap }}
{{- end }}
{{- end }}

{{/*
Port the gRPC probes target: the plaintext health port when TLS is on, else the gRPC port.
*/}}
{{- define "persistentkv.probePort" -}}
{{- if .Values.tls.enabled }}{{ .Values.tls.healthPort }}{{ else }}{{ .Values.ports.grpc }}{{ end }}
{{- end }}

{{/*
"true" when the worker container requests a GPU: gpu.count > 0, or gpu.resourceName or an
nvidia.com/ resource set directly in resources.requests or resources.limits; else "".
*/}}
{{- define "persistentkv.requestsGpu" -}}
{{- $found := gt (int .Values.gpu.count) 0 }}
{{- $resources := .Values.resources | default dict }}
{{- range $section := list "requests" "limits" }}
{{- range $name, $_ := (get $resources $section | default dict) }}
{{- if or (eq $name $.Values.gpu.resourceName) (hasPrefix "nvidia.com/" $name) }}
{{- $found = true }}
{{- end }}
{{- end }}
{{- end }}
{{- if $found }}true{{ end }}
{{- end }}

{{/*
The --backend the worker runs: worker.backend=auto becomes cuda when the pod requests a GPU (so a
pod without a usable one fails at start-up instead of serving on the CPU) and cpu otherwise.
*/}}
{{- define "persistentkv.backend" -}}
{{- if ne .Values.worker.backend "auto" }}
{{- .Values.worker.backend }}
{{- else if include "persistentkv.requestsGpu" . }}cuda
{{- else }}cpu
{{- end }}
{{- end }}

{{/*
Cross-field checks the schema cannot express; a failure stops install, upgrade and template.
*/}}
{{- define "persistentkv.validate" -}}
{{- $v := .Values }}
{{- if ne (mod (int $v.worker.model.numQHeads) (int $v.worker.model.numKvHeads)) 0 }}
{{- fail (printf "worker.model.numQHeads (%v) must be a multiple of worker.model.numKvHeads (%v)" $v.worker.model.numQHeads $v.worker.model.numKvHeads) }}
{{- end }}
{{- $gpu := include "persistentkv.requestsGpu" . }}
{{- if and (eq $v.worker.backend "cuda") (not $gpu) }}
{{- fail "worker.backend=cuda needs a GPU: set gpu.count >= 1" }}
{{- end }}
{{- if and (eq $v.worker.backend "cpu") $gpu }}
{{- fail (printf "worker.backend=cpu with a GPU request (gpu.count=%v or a GPU in resources) would hold a GPU it never uses: set gpu.count=0 for a CPU deployment, or worker.backend=auto" $v.gpu.count) }}
{{- end }}
{{- $pool := $v.worker.kvPool }}
{{- $sizes := list }}
{{- if gt (int64 $pool.numPages) 0 }}{{ $sizes = append $sizes (printf "numPages=%v" (int64 $pool.numPages)) }}{{ end }}
{{- if gt (int64 $pool.bytes) 0 }}{{ $sizes = append $sizes (printf "bytes=%v" (int64 $pool.bytes)) }}{{ end }}
{{- if gt (float64 $pool.gpuMemoryFraction) 0.0 }}{{ $sizes = append $sizes (printf "gpuMemoryFraction=%v" $pool.gpuMemoryFraction) }}{{ end }}
{{- if ne (len $sizes) 1 }}
{{- fail (printf "worker.kvPool: set exactly one of numPages, bytes and gpuMemoryFraction, got %d (%s); bytes defaults to 32 GiB, so set worker.kvPool.bytes=0 when you size the pool another way" (len $sizes) (join ", " $sizes)) }}
{{- end }}
{{- if and (gt (float64 $pool.gpuMemoryFraction) 0.0) (eq (include "persistentkv.backend" .) "cpu") }}
{{- fail "worker.kvPool.gpuMemoryFraction sizes the CUDA backend's pool, but this worker runs --backend=cpu (no GPU request): size it with worker.kvPool.bytes or numPages" }}
{{- end }}
{{- $needed := add (int $v.lifecycle.preStopSleepSeconds) (int $v.worker.shutdownGraceSeconds) 5 }}
{{- if lt (int $v.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be at least lifecycle.preStopSleepSeconds + worker.shutdownGraceSeconds + 5 (%v)" $v.terminationGracePeriodSeconds $needed) }}
{{- end }}
{{- if and $v.tls.enabled (not $v.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName" }}
{{- end }}
{{- if and $v.tls.enabled (or (eq (int $v.tls.healthPort) (int $v.ports.grpc)) (eq (int $v.tls.healthPort) (int $v.ports.metrics))) }}
{{- fail "tls.healthPort must differ from ports.grpc and ports.metrics" }}
{{- end }}
{{- if eq (int $v.ports.grpc) (int $v.ports.metrics) }}
{{- fail "ports.grpc and ports.metrics must differ" }}
{{- end }}
{{- if and $v.metrics.serviceMonitor.enabled (not $v.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" }}
{{- end }}
{{- if and $v.calibration.profile $v.calibration.existingConfigMap }}
{{- fail "set only one of calibration.profile and calibration.existingConfigMap" }}
{{- end }}
{{- end }}
