{{/*
Named templates of the emserve chart. Everything that two templates must agree on is defined here once:
names, labels, the image, the container paths, and the termination grace period derived from the
server's drain timeout.
*/}}

{{/* The chart name, overridable with nameOverride; 63 characters at most (a DNS label). */}}
{{- define "emserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name: the StatefulSet, the client Service and the prefix of everything else.
52 characters at most: a StatefulSet's pods carry a controller-revision-hash label of the name plus an
11-character hash, and labels are limited to 63 characters.
*/}}
{{- define "emserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The headless Service that governs the StatefulSet (stable per-replica DNS names). */}}
{{- define "emserve.headlessName" -}}
{{- printf "%s-headless" (include "emserve.fullname" .) }}
{{- end }}

{{- define "emserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "emserve.labels" -}}
helm.sh/chart: {{ include "emserve.chart" . }}
{{ include "emserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels. They are immutable in a StatefulSet's selector and volumeClaimTemplates: never add a
label here that changes between releases (like the chart version).
*/}}
{{- define "emserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "emserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "emserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "emserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image variant: cuda with a GPU, else cpu (deploy/docker/Dockerfile.<variant>). */}}
{{- define "emserve.variant" -}}
{{- ternary "cuda" "cpu" .Values.gpu.enabled }}
{{- end }}

{{/* The image reference: <repository>@<digest>, or <repository>:<tag or appVersion>-<variant>. */}}
{{- define "emserve.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s-%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) (include "emserve.variant" .) }}
{{- end }}
{{- end }}

{{/* Paths inside the container (the images' volumes, deploy/docker). */}}
{{- define "emserve.sessionsPath" -}}/data/sessions{{- end }}
{{- define "emserve.cachePath" -}}/data/cache{{- end }}
{{- define "emserve.homePath" -}}/home/emserve{{- end }}

{{/*
terminationGracePeriodSeconds, derived from the server's own drain timeout so that kubelet never kills
the server while it drains or checkpoints: the preStop sleep runs first (it counts against the period),
then SIGTERM starts the server's drain of server.graceSeconds, then the open sessions are checkpointed
and the engine exits (lifecycle.checkpointSeconds).
*/}}
{{- define "emserve.terminationGracePeriodSeconds" -}}
{{- add (int .Values.lifecycle.preStopSleepSeconds) (ceil .Values.server.graceSeconds | int) (int .Values.lifecycle.checkpointSeconds) }}
{{- end }}

{{/* The Secret holding the auth token: an existing one, or the one this chart creates. */}}
{{- define "emserve.authSecretName" -}}
{{- default (printf "%s-auth" (include "emserve.fullname" .)) .Values.server.auth.existingSecret }}
{{- end }}

{{/* Whether this chart creates the auth Secret; fails when auth is on without any token source. */}}
{{- define "emserve.createAuthSecret" -}}
{{- if and .Values.server.auth.enabled (not .Values.server.auth.existingSecret) }}
{{- $_ := required "server.auth.enabled needs server.auth.existingSecret or server.auth.token" .Values.server.auth.token }}
{{- print "true" }}
{{- end }}
{{- end }}

{{/* The container's resources: the cpu or gpu profile, plus the GPUs in the limits. */}}
{{- define "emserve.resources" -}}
{{- if .Values.gpu.enabled }}
{{- $res := deepCopy .Values.resources.gpu }}
{{- $limits := default (dict) $res.limits }}
{{- $_ := set $limits .Values.gpu.resourceName (int .Values.gpu.count) }}
{{- $_ := set $res "limits" $limits }}
{{- toYaml $res }}
{{- else }}
{{- toYaml .Values.resources.cpu }}
{{- end }}
{{- end }}

{{/*
storageClassName of a claim from a persistence block: empty: none (the cluster's default class);
"-": an explicit "" (no class, static provisioning); else the class.
*/}}
{{- define "emserve.storageClass" -}}
{{- if eq .storageClassName "-" }}
storageClassName: ""
{{- else if .storageClassName }}
storageClassName: {{ .storageClassName | quote }}
{{- end }}
{{- end }}

{{/*
EMSERVE_MAX_DISK_GIB: server.maxDiskGiB, or for "auto" 90% of persistence.sessions.size (a quantity
with a binary or decimal suffix, or bytes).
*/}}
{{- define "emserve.maxDiskGiB" -}}
{{- $quota := .Values.server.maxDiskGiB }}
{{- if eq (toString $quota) "auto" }}
{{- $size := toString .Values.persistence.sessions.size }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$" $size) }}
{{- fail (printf "server.maxDiskGiB auto cannot read persistence.sessions.size %q; set server.maxDiskGiB" $size) }}
{{- end }}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $size }}
{{- $unit := trimPrefix $num $size }}
{{- $gib := dict "" 9.313225746154785e-10 "Ki" 9.5367431640625e-07 "Mi" 0.0009765625 "Gi" 1.0 "Ti" 1024.0 "Pi" 1048576.0 "k" 9.313225746154785e-07 "M" 0.0009313225746154785 "G" 0.9313225746154785 "T" 931.3225746154785 "P" 931322.5746154785 }}
{{- printf "%.3f" (mulf (float64 $num) (get $gib $unit) 0.9) }}
{{- else }}
{{- print $quota }}
{{- end }}
{{- end }}
