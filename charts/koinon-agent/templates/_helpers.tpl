{{/* Chart name, truncated to 63 characters (DNS label limit). */}}
{{- define "koinon-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or <release> when it already holds the chart name. */}}
{{- define "koinon-agent.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "koinon-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "koinon-agent.labels" -}}
helm.sh/chart: {{ include "koinon-agent.chart" . }}
{{ include "koinon-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: volunteer-agent
app.kubernetes.io/part-of: koinon
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the agent's pods (immutable once installed). */}}
{{- define "koinon-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "koinon-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "koinon-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "koinon-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "koinon-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret and key the join token is read from. */}}
{{- define "koinon-agent.tokenSecretName" -}}
{{- if .Values.joinToken.existingSecret }}
{{- .Values.joinToken.existingSecret }}
{{- else }}
{{- printf "%s-join-token" (include "koinon-agent.fullname" .) }}
{{- end }}
{{- end }}

{{- define "koinon-agent.tokenSecretKey" -}}
{{- if .Values.joinToken.existingSecret }}{{ .Values.joinToken.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{- define "koinon-agent.caMountPath" -}}/etc/koinon/gateway-ca{{- end }}

{{/*
Rules that one value cannot express in values.schema.json: combinations of values. Each failure
names the values involved and what to do.
*/}}
{{- define "koinon-agent.validate" -}}
{{- $v := .Values }}
{{- if and $v.joinToken.value $v.joinToken.existingSecret }}
{{- fail "joinToken: set joinToken.value or joinToken.existingSecret, not both" }}
{{- end }}
{{- if not (or $v.joinToken.value $v.joinToken.existingSecret) }}
{{- fail "joinToken: set joinToken.value (the token from the platform team) or joinToken.existingSecret (a Secret holding it)" }}
{{- end }}
{{- if and $v.gateway.caCert $v.gateway.caSecretName }}
{{- fail "gateway: set gateway.caCert or gateway.caSecretName, not both" }}
{{- end }}
{{- if and $v.gateway.insecure (or $v.gateway.caCert $v.gateway.caSecretName $v.gateway.caCertHash) }}
{{- fail "gateway.insecure: plaintext cannot be combined with gateway.caCert/gateway.caSecretName/gateway.caCertHash" }}
{{- end }}
{{- if and (gt (int $v.gpus.count) 0) (gt (int $v.gpus.simulate) 0) }}
{{- fail "gpus: set gpus.count (real GPUs) or gpus.simulate (simulated GPUs), not both" }}
{{- end }}
{{- if eq $v.kind "DaemonSet" }}
{{- $surge := dig "rollingUpdate" "maxSurge" 0 ($v.updateStrategy | default dict) }}
{{- if not (has (toString $surge) (list "0" "0%")) }}
{{- fail (printf "updateStrategy.rollingUpdate.maxSurge: %v would start a node's new agent beside its old one, on the same state dir (one credential, two Ray nodes); use 0 (the default) and maxUnavailable" $surge) }}
{{- end }}
{{- end }}
{{- range $key, $_ := $v.podLabels }}
{{- if has $key (list "app.kubernetes.io/name" "app.kubernetes.io/instance") }}
{{- fail (printf "podLabels: %s is one of the chart's selector labels; overriding it would leave the pods unmatched by their %s" $key $v.kind) }}
{{- end }}
{{- end }}
{{- if and (eq $v.persistence.type "pvc") (eq $v.kind "DaemonSet") }}
{{- fail "persistence.type: pvc needs kind: Deployment (one claim cannot serve every node); use hostPath with a DaemonSet" }}
{{- end }}
{{- $mount := trimSuffix "/" $v.persistence.mountPath }}
{{- range $taken := list "/tmp" "/dev/shm" (include "koinon-agent.caMountPath" $) }}
{{- if or (eq $mount $taken) (hasPrefix (printf "%s/" $taken) $mount) (hasPrefix (printf "%s/" $mount) $taken) }}
{{- fail (printf "persistence.mountPath: %s overlaps %s, which the chart mounts already (Ray's temp dir, shared memory, the CA); use a path of its own such as /var/lib/koinon-agent" $v.persistence.mountPath $taken) }}
{{- end }}
{{- end }}
{{- $needed := add (int $v.agent.drainGraceSeconds) 20 }}
{{- if lt (int $v.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds: %d is too short; it must be at least agent.drainGraceSeconds + 20 = %d so that a stopping agent drains its Ray node and then stops it" (int $v.terminationGracePeriodSeconds) (int $needed)) }}
{{- end }}
{{- end }}
