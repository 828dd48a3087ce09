{{/* Chart name, overridable. */}}
{{- define "ekp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the release name when it already contains the chart name. */}}
{{- define "ekp.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ekp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ekp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ekp.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ekp.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: node-agent
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "ekp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ekp.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ekp.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* "IP:PORT", with brackets for IPv6: (list ADDRESS PORT). */}}
{{- define "ekp.hostPort" -}}
{{- $addr := index . 0 -}}
{{- $port := int64 (index . 1) -}}
{{- if contains ":" $addr -}}
{{- printf "[%s]:%d" $addr $port -}}
{{- else -}}
{{- printf "%s:%d" $addr $port -}}
{{- end -}}
{{- end -}}

{{/* The API server URL for --master; fails with an explanation when not configured. */}}
{{- define "ekp.apiServerURL" -}}
{{- $why := "the agent connects to the API server directly, because without kube-proxy the `kubernetes` Service is served by the agent itself. EKS: --set k8sServiceHost=<cluster endpoint without https://> (aws eks describe-cluster --name CLUSTER --query cluster.endpoint --output text) --set k8sServicePort=443; kubeadm: --set k8sServiceHost=<controlPlaneEndpoint host> --set k8sServicePort=6443" -}}
{{- if not .Values.k8sServiceHost -}}
{{- fail (printf "k8sServiceHost is required: %s" $why) -}}
{{- end -}}
{{- if eq (toString .Values.k8sServicePort) "" -}}
{{- fail (printf "k8sServicePort is required: %s" $why) -}}
{{- end -}}
{{- printf "https://%s" (include "ekp.hostPort" (list .Values.k8sServiceHost .Values.k8sServicePort)) -}}
{{- end -}}

{{- define "ekp.isLoopback" -}}
{{- if or (hasPrefix "127." .) (eq . "::1") -}}true{{- end -}}
{{- end -}}

{{/* Whether the metrics Service is rendered (also for a ServiceMonitor). */}}
{{- define "ekp.metricsService" -}}
{{- if and .Values.metrics.enabled (or .Values.metrics.service.enabled .Values.metrics.serviceMonitor.enabled) -}}true{{- end -}}
{{- end -}}

{{/* Where the agent sees the host's cgroup v2 root. */}}
{{- define "ekp.cgroupMount" -}}/run/ebpf-kube-proxy/cgroupv2{{- end -}}

{{/* The agent's command-line flags, one YAML list item each. */}}
{{- define "ekp.args" -}}
{{- $c := .Values.config -}}
- {{ printf "--pin-path=%s" .Values.bpf.pinPath | quote }}
- run
- {{ printf "--master=%s" (include "ekp.apiServerURL" .) | quote }}
- {{ printf "--cgroup=%s" (include "ekp.cgroupMount" .) | quote }}
- {{ printf "--healthz-bind-address=%s" (include "ekp.hostPort" (list .Values.healthz.bindAddress .Values.healthz.port)) | quote }}
{{- if .Values.metrics.enabled }}
- {{ printf "--metrics-bind-address=%s" (include "ekp.hostPort" (list .Values.metrics.bindAddress .Values.metrics.port)) | quote }}
{{- else }}
- "--metrics-bind-address="
{{- end }}
{{- /* 0 means the default, as in kube-proxy's configuration (kubeadm writes 0s). */}}
{{- $zero := "^((0+([.]0*)?|[.]0+)(ns|us|µs|μs|ms|s|m|h)?)+$" }}
{{- if not (regexMatch $zero (toString $c.minSyncPeriod)) }}
- {{ printf "--min-sync-period=%s" $c.minSyncPeriod | quote }}
{{- end }}
{{- if not (regexMatch $zero (toString $c.syncPeriod)) }}
- {{ printf "--sync-period=%s" $c.syncPeriod | quote }}
{{- end }}
{{- /* Flags other issues add to the agent: passed only when set. */}}
{{- range $key, $flag := dict "services" "--map-size-services" "backends" "--map-size-backends" "revNat" "--map-size-rev-nat" "sockRevNat" "--map-size-sock-rev-nat" "affinity" "--map-size-affinity" "natCt" "--map-size-nat-ct" "sourceRanges" "--map-size-source-ranges" }}
{{- $size := index $c.mapSizes $key }}
{{- if $size }}
- {{ printf "%s=%d" $flag (int64 $size) | quote }}
{{- end }}
{{- end }}
{{- with $c.nodePortAddresses }}
- {{ printf "--nodeport-addresses=%s" (join "," .) | quote }}
{{- end }}
{{- with $c.nodePortRange }}
- {{ printf "--nodeport-range=%s" . | quote }}
{{- end }}
{{- with $c.snatPortRange }}
- {{ printf "--snat-port-range=%s" . | quote }}
{{- end }}
{{- with $c.devices }}
- {{ printf "--devices=%s" (join "," .) | quote }}
{{- end }}
{{- if $c.externalClusterIP }}
- "--external-clusterip"
{{- end }}
{{- if not $c.localhostNodePorts }}
- "--localhost-nodeports=false"
{{- end }}
{{- with $c.conntrackGCInterval }}
- {{ printf "--conntrack-gc-interval=%s" . | quote }}
{{- end }}
{{- with $c.bpfLogLevel }}
- {{ printf "--bpf-log-level=%s" . | quote }}
{{- end }}
{{- if $c.socketLB.hostNamespaceOnly }}
- "--socket-lb-host-namespace-only"
{{- with $c.socketLB.podDevices }}
- {{ printf "--pod-devices=%s" (join "," .) | quote }}
{{- end }}
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Container security context of the agent. */}}
{{- define "ekp.agentSecurityContext" -}}
{{- if .Values.securityContext.privileged -}}
privileged: true
{{- else -}}
privileged: false
{{- if not (has "SYS_ADMIN" .Values.securityContext.capabilities) }}
allowPrivilegeEscalation: false
{{- end }}
capabilities:
  drop:
    - ALL
  {{- with .Values.securityContext.capabilities }}
  add:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
readOnlyRootFilesystem: true
runAsUser: 0
runAsGroup: 0
{{- with .Values.securityContext.seLinuxOptions }}
seLinuxOptions:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if and .Values.securityContext.appArmorProfile (not .Values.securityContext.privileged) (include "ekp.appArmorField" .) }}
appArmorProfile:
  {{- toYaml .Values.securityContext.appArmorProfile | nindent 2 }}
{{- end }}
{{- end -}}

{{/* "true" when the cluster takes securityContext.appArmorProfile (Kubernetes 1.30+). */}}
{{- define "ekp.appArmorField" -}}
{{- if semverCompare ">=1.30-0" .Capabilities.KubeVersion.Version -}}true{{- end -}}
{{- end -}}

{{/* The agent's AppArmor profile as the annotation clusters before 1.30 read; empty when
the field is used, the agent is privileged (unconfined already) or no profile is set. */}}
{{- define "ekp.appArmorAnnotation" -}}
{{- $p := .Values.securityContext.appArmorProfile -}}
{{- if and $p (not .Values.securityContext.privileged) (not (include "ekp.appArmorField" .)) -}}
{{- if eq $p.type "Unconfined" -}}unconfined
{{- else if eq $p.type "RuntimeDefault" -}}runtime/default
{{- else if eq $p.type "Localhost" -}}{{ printf "localhost/%s" $p.localhostProfile }}
{{- end -}}
{{- end -}}
{{- end -}}
