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

{{/* Where KOINON_TOKEN comes from, and what to check when it is empty (KOINON_TOKEN_HINT). */}}
{{- define "koinon-agent.tokenHint" -}}
{{- $secret := printf "Secret %q (key %q) in namespace %s" (include "koinon-agent.tokenSecretName" .) (include "koinon-agent.tokenSecretKey" .) .Release.Namespace }}
{{- if .Values.joinToken.existingSecret }}
{{- printf "%s was not found or is empty; check joinToken.existingSecret and joinToken.existingSecretKey" $secret }}
{{- else if .Values.joinToken.value }}
{{- printf "%s, which the chart makes from joinToken.value, was not found or is empty" $secret }}
{{- else }}
{{- print "the release sets neither joinToken.value nor joinToken.existingSecret; set one (helm upgrade)" }}
{{- end }}
{{- end }}

{{- define "koinon-agent.caMountPath" -}}/etc/koinon/gateway-ca{{- end }}

{{/*
The gateway's address as a NetworkPolicy CIDR when gateway.address's host is an IP literal
("10.0.0.5:7443" → 10.0.0.5/32, "[fd00::5]:7443" → fd00::5/128); empty for a host name or a unix
socket. The policy allows it whether or not it is private: the chart cannot tell, and with
networkPolicy.allowExternalEgress false even a public one needs it.
*/}}
{{- define "koinon-agent.gatewayCIDR" -}}
{{- $address := .Values.gateway.address }}
{{- if not (hasPrefix "unix:" $address) }}
{{- $host := regexReplaceAll ":[0-9]+$" $address "" }}
{{- $octet := "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])" }}
{{- if regexMatch (printf "^%s(\\.%s){3}$" $octet $octet) $host }}
{{- printf "%s/32" $host }}
{{- else if and (hasPrefix "[" $host) (hasSuffix "]" $host) }}
{{- printf "%s/128" ($host | trimPrefix "[" | trimSuffix "]") }}
{{- end }}
{{- end }}
{{- end }}

{{/*
networkPolicy with the defaults of values.yaml for what it lacks, as JSON (read it with fromJson).
A release installed by a chart before 0.2.1 has no networkPolicy in its values at all, and `helm
upgrade --reuse-values` renders this chart with those values instead of values.yaml; a section
nulled in a values file (`networkPolicy:` with every key commented out) is dropped by Helm too.
Both get the policy values.yaml describes, not none.
*/}}
{{- define "koinon-agent.networkPolicy" -}}
{{- $given := .Values.networkPolicy | default dict }}
{{- $np := dict "enabled" true "allowExternalEgress" true "extraEgress" (list) }}
{{- range $key := list "enabled" "allowExternalEgress" "extraEgress" }}
{{- if not (kindIs "invalid" (index $given $key)) }}
{{- $_ := set $np $key (index $given $key) }}
{{- end }}
{{- end }}
{{- $np | toJson }}
{{- end }}

{{/*
sizeLimit of /tmp; empty: none. values.yaml leaves tmpSizeLimit unset so that Helm keeps an
explicit null (it drops a null it can replace with a default of values.yaml), and a release
installed by a chart before 0.2.1 (whose values, which `helm upgrade --reuse-values` renders this
chart with, have no tmpSizeLimit) gets the limit too: unset means 20Gi, null or "" none.
*/}}
{{- define "koinon-agent.tmpSizeLimit" -}}
{{- if hasKey .Values "tmpSizeLimit" }}
{{- .Values.tmpSizeLimit | default "" }}
{{- else }}
{{- print "20Gi" }}
{{- end }}
{{- end }}

{{/* The port of gateway.address ("host:port"; the schema requires one). */}}
{{- define "koinon-agent.gatewayPort" -}}
{{- regexFind "[0-9]+$" .Values.gateway.address }}
{{- end }}

{{/*
Bytes of a Kubernetes quantity ("2Gi", "512k", "1.5G", 1073741824), as an integer string.
Argument: (list "<value's name>" <quantity>), the name for the message.
*/}}
{{- define "koinon-agent.bytes" -}}
{{- $name := index . 0 }}
{{- $quantity := index . 1 }}
{{- if kindIs "string" $quantity }}
{{- $number := regexFind "^\\+?([0-9]+\\.?[0-9]*|\\.[0-9]+)([eE][-+]?[0-9]+)?" $quantity }}
{{- $units := dict "" 1.0 "m" 1e-3 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 }}
{{- $suffix := trimPrefix $number $quantity }}
{{- if or (not $number) (not (hasKey $units $suffix)) }}
{{- fail (printf "%s: %q is not a size the chart reads: write a number with one of the suffixes k M G T P E Ki Mi Gi Ti Pi Ei, or none" $name $quantity) }}
{{- end }}
{{- $bytes := mulf (float64 (trimPrefix "+" $number)) (get $units $suffix) | floor }}
{{- /* At most 8 EiB: int64 wraps above (a negative size). No machine has that much. */}}
{{- if ge $bytes 9.2e18 }}9200000000000000000{{ else }}{{ $bytes | int64 }}{{ end }}
{{- else if ge (float64 $quantity) 9.2e18 }}9200000000000000000
{{- else }}
{{- $quantity | int64 }}
{{- end }}
{{- end }}

{{/*
Bytes of Ray's object store the agent passes to `ray start --object-store-memory`; empty: Ray's
choice. Ray's own default is 30 % of the container's free memory, which with the defaults (8Gi
limit) is more than the 2Gi /dev/shm: Ray then puts the store on /tmp, the node's disk. So with a
/dev/shm of its own the chart sizes the store itself: 80 % of shmSize (the rest for job code's own
shared memory, e.g. PyTorch's DataLoader), and no more than Ray's 30 % of resources.limits.memory
(the store's pages count against the container's memory).
*/}}
{{- define "koinon-agent.objectStoreMemory" -}}
{{- if not (kindIs "invalid" .Values.agent.objectStoreMemory) }}
{{- .Values.agent.objectStoreMemory | int64 }}
{{- else if .Values.shmSize }}
{{- $store := mulf (include "koinon-agent.bytes" (list "shmSize" .Values.shmSize) | float64) 0.8 }}
{{- $limit := dig "limits" "memory" "" (.Values.resources | default dict) }}
{{- if $limit }}
{{- $store = minf $store (mulf (include "koinon-agent.bytes" (list "resources.limits.memory" $limit) | float64) 0.3) }}
{{- end }}
{{- $store | floor | int64 }}
{{- end }}
{{- end }}

{{/*
Rules that one value cannot express in values.schema.json: combinations of values. Each failure
names the values involved and what to do.
*/}}
{{- define "koinon-agent.validate" -}}
{{- $v := .Values }}
{{- /* The token's format is checked here, not by a schema pattern: helm prints a value that fails
a pattern in full, and this one is a secret. Surrounding whitespace is dropped (a file passed with
--set-file ends in a newline), as the agent and the gateway drop it. */}}
{{- if and $v.joinToken.value (not (regexMatch "^[a-z0-9]{6}[.][a-z0-9]{16}$" (trim $v.joinToken.value))) }}
{{- fail "joinToken.value: not a join token (expected six lowercase letters or digits, a dot, then sixteen, as `koinon-gateway token create` prints; the value is not shown here, it is a secret)" }}
{{- end }}
{{- if and $v.joinToken.value $v.joinToken.existingSecret }}
{{- fail "joinToken: set joinToken.value or joinToken.existingSecret, not both" }}
{{- end }}
{{- if and (not (or $v.joinToken.value $v.joinToken.existingSecret)) (eq $v.persistence.type "emptyDir") }}
{{- fail "joinToken: set joinToken.value (the token from the platform team) or joinToken.existingSecret (a Secret holding it); only with persistence.type pvc or hostPath, whose node credential outlives the pod, may a joined node go without" }}
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
{{- if $v.shmSize }}
{{- $shm := include "koinon-agent.bytes" (list "shmSize" $v.shmSize) | int64 }}
{{- $store := include "koinon-agent.objectStoreMemory" $ | int64 }}
{{- if gt $store $shm }}
{{- fail (printf "agent.objectStoreMemory: %d bytes do not fit in shmSize: %s (%d bytes), the /dev/shm Ray keeps its object store in; Ray would put it on disk (/tmp), or above 10 GB refuse to start; raise shmSize or lower agent.objectStoreMemory" $store $v.shmSize $shm) }}
{{- end }}
{{- if lt $store 78643200 }}
{{- fail (printf "shmSize: %s (with resources.limits.memory: %v) leaves Ray's object store %d bytes, less than its minimum of 78643200 (75 MiB); the chart gives it 80 %% of shmSize and at most 30 %% of resources.limits.memory: raise them or set agent.objectStoreMemory" $v.shmSize (dig "limits" "memory" "none" ($v.resources | default dict)) $store) }}
{{- end }}
{{- end }}
{{- with include "koinon-agent.tmpSizeLimit" $ }}
{{- if lt (include "koinon-agent.bytes" (list "tmpSizeLimit" .) | int64) 1073741824 }}
{{- fail (printf "tmpSizeLimit: %s is less than 1Gi; /tmp holds Ray's session logs, runtime_env installs and spilled objects, and the kubelet evicts the pod once they pass it; raise it, or set \"\" for no limit" .) }}
{{- end }}
{{- end }}
{{- $np := include "koinon-agent.networkPolicy" $ | fromJson }}
{{- if and $np.enabled (not $np.allowExternalEgress) (not $np.extraEgress) (not (hasPrefix "unix:" $v.gateway.address)) (not (include "koinon-agent.gatewayCIDR" $)) }}
{{- fail (printf "networkPolicy.allowExternalEgress: false leaves the pod DNS, an IP-literal gateway.address and networkPolicy.extraEgress only, and gateway.address %s names a host: add it to networkPolicy.extraEgress (its address as cidr, or for a gateway in this cluster its pods as to)" $v.gateway.address) }}
{{- end }}
{{- range $i, $rule := $np.extraEgress }}
{{- if eq (len (pick $rule "cidr" "to")) 2 }}
{{- fail (printf "networkPolicy.extraEgress[%d]: give cidr or to, not both (make two entries)" $i) }}
{{- end }}
{{- range $rule.ports }}
{{- if and .endPort (lt (int .endPort) (int .port)) }}
{{- fail (printf "networkPolicy.extraEgress[%d].ports: endPort %d is below port %d" $i (int .endPort) (int .port)) }}
{{- end }}
{{- end }}
{{- end }}
{{- $needed := add (int $v.agent.drainGraceSeconds) 20 }}
{{- if lt (int $v.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds: %d is too short; it must be at least agent.drainGraceSeconds + 20 = %d so that a stopping agent drains its Ray node and then stops it" (int $v.terminationGracePeriodSeconds) (int $needed)) }}
{{- end }}
{{- end }}
