{{/*
Cross-field checks JSON Schema cannot express (values.schema.json bounds each
field alone). Included from deployment.yaml, so `helm lint`, `helm template`
and `helm install` all refuse bad values with one clear line.
*/}}
{{- define "wscluster.validate" -}}
{{- $c := .Values.config }}
{{- if le (int $c.leaseTtlMs) (mul 2 (int $c.heartbeatMs)) }}
{{- fail (printf "config.leaseTtlMs (%d) must be greater than 2 x config.heartbeatMs (%d): a node would lose its lease between two renewals" (int $c.leaseTtlMs) (int $c.heartbeatMs)) }}
{{- end }}
{{- if lt (int .Values.replicaCount) 1 }}
{{- fail "replicaCount must be at least 1" }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) }}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- if not (or (gt (int .Values.autoscaling.targetCPUUtilizationPercentage) 0) (gt (int .Values.autoscaling.targetMemoryUtilizationPercentage) 0) (gt (int .Values.autoscaling.connectionsPerPod) 0) .Values.autoscaling.extraMetrics) }}
{{- fail "autoscaling.enabled needs a metric: targetCPUUtilizationPercentage, targetMemoryUtilizationPercentage, connectionsPerPod or extraMetrics" }}
{{- end }}
{{- end }}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) }}
{{- $min := int (include "wscluster.minGraceSeconds" .) }}
{{- if le (int .Values.terminationGracePeriodSeconds) $min }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than lifecycle.preStopSleepSeconds + ceil(config.drainMs/1000) + 1 = %d, or the kubelet kills draining nodes; leave it null to compute it" (int .Values.terminationGracePeriodSeconds) $min) }}
{{- end }}
{{- end }}
{{- if eq (include "wscluster.redisMode" .) "" }}
{{- fail "no Redis: set redis.url (or redis.existingSecret), or redis.enabled=true for a trial Redis" }}
{{- end }}
{{- if and .Values.redis.cluster (eq (include "wscluster.redisMode" .) "trial") }}
{{- fail "redis.cluster=true needs redis.url (or redis.existingSecret) with the Redis Cluster seed nodes: the trial Redis is a single Redis" }}
{{- end }}
{{- if and .Values.redis.url .Values.redis.existingSecret }}
{{- fail "set only one of redis.url and redis.existingSecret" }}
{{- end }}
{{- if and .Values.auth.existingSecret (or .Values.auth.jwtSecret .Values.auth.apiKey) }}
{{- fail "auth.existingSecret is set: leave auth.jwtSecret and auth.apiKey empty (they would be ignored)" }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (kindIs "invalid" .Values.podDisruptionBudget.minAvailable) (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable) }}
{{- fail "podDisruptionBudget.enabled needs maxUnavailable or minAvailable" }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (not .Values.autoscaling.enabled) (eq (int .Values.replicaCount) 1) (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) }}
{{- if eq (toString .Values.podDisruptionBudget.minAvailable) "1" }}
{{- fail "podDisruptionBudget.minAvailable=1 with replicaCount=1 blocks every node drain; use maxUnavailable: 1" }}
{{- end }}
{{- end }}
{{- end }}
