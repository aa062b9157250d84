{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "wscluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name; the Redis objects append "-redis", so keep room. */}}
{{- define "wscluster.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 57 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 57 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 57 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "wscluster.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels common to every object of the release. */}}
{{- define "wscluster.commonLabels" -}}
helm.sh/chart: {{ include "wscluster.chart" . }}
app.kubernetes.io/name: {{ include "wscluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: wscluster
{{- end }}

{{/* Node pods: selector labels (component "node", so the trial Redis never matches). */}}
{{- define "wscluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wscluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
{{- end }}

{{- define "wscluster.labels" -}}
{{ include "wscluster.commonLabels" . }}
app.kubernetes.io/component: node
{{- end }}

{{/* Trial Redis labels. */}}
{{- define "wscluster.redis.fullname" -}}
{{- printf "%s-redis" (include "wscluster.fullname" .) }}
{{- end }}

{{- define "wscluster.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wscluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis-trial
{{- end }}

{{- define "wscluster.redis.labels" -}}
{{ include "wscluster.commonLabels" . }}
app.kubernetes.io/component: redis-trial
wscluster.io/trial-only: "true"
{{- end }}

{{- define "wscluster.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "wscluster.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "wscluster.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Name of the chart-managed Secret. */}}
{{- define "wscluster.secretName" -}}
{{- include "wscluster.fullname" . }}
{{- end }}

{{/*
Which Redis the nodes use: "url" (redis.url, stored in the chart Secret),
"existing" (redis.existingSecret), "trial" (in-chart Redis), or "" (none).
*/}}
{{- define "wscluster.redisMode" -}}
{{- if .Values.redis.url }}url
{{- else if .Values.redis.existingSecret }}existing
{{- else if .Values.redis.enabled }}trial
{{- end }}
{{- end }}

{{/* "true" when the chart itself must provide WSC_JWT_SECRET. */}}
{{- define "wscluster.chartJwtSecret" -}}
{{- if and (not .Values.auth.existingSecret) (or .Values.auth.jwtSecret (not (or .Values.auth.jwtPublicKey .Values.config.dev))) }}true{{ end }}
{{- end }}

{{/* "true" when the chart renders its own Secret. */}}
{{- define "wscluster.chartSecret" -}}
{{- if or (include "wscluster.chartJwtSecret" .) (and (not .Values.auth.existingSecret) .Values.auth.apiKey) (eq (include "wscluster.redisMode" .) "url") }}true{{ end }}
{{- end }}

{{/* Seconds, rounded up, of the node's drain window. */}}
{{- define "wscluster.drainSeconds" -}}
{{- div (add (int .Values.config.drainMs) 999) 1000 }}
{{- end }}

{{/*
Minimum grace the pod needs: preStop pause + drain window + the 1 s the node
may take after it (CONTRACT: exits within drainMs + 1 s of SIGTERM).
*/}}
{{- define "wscluster.minGraceSeconds" -}}
{{- add (int .Values.lifecycle.preStopSleepSeconds) (int (include "wscluster.drainSeconds" .)) 1 }}
{{- end }}

{{- define "wscluster.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (int (include "wscluster.minGraceSeconds" .)) 4 }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}
