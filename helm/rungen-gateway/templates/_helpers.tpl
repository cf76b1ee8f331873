{{/*
Chart name (app.kubernetes.io/name), truncated to 63 characters.
*/}}
{{- define "rungen-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the prefix of every resource name. 63 characters at most (DNS label).
*/}}
{{- define "rungen-gateway.fullname" -}}
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

{{/*
Chart name and version (helm.sh/chart).
*/}}
{{- define "rungen-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels on every resource.
*/}}
{{- define "rungen-gateway.labels" -}}
helm.sh/chart: {{ include "rungen-gateway.chart" . }}
{{ include "rungen-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rungen-gateway
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels (stable across upgrades: never add to them).
*/}}
{{- define "rungen-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rungen-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "rungen-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rungen-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Container image reference (digest wins over tag).
*/}}
{{- define "rungen-gateway.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Paths inside the container. The image's default command (Dockerfile CMD) uses the same config
path; .ci/helm-check.sh checks that they agree. Each is its own volume (siblings, never nested, no
subPath): kubelet then updates every file in place and the gateway's hot reload sees the change.
*/}}
{{- define "rungen-gateway.binary" -}}/usr/local/bin/rungen-gateway{{- end }}
{{- define "rungen-gateway.configDir" -}}/etc/rungen-gateway/config{{- end }}
{{- define "rungen-gateway.configFile" -}}{{ include "rungen-gateway.configDir" . }}/gateway.toml{{- end }}
{{- define "rungen-gateway.secretsDir" -}}/etc/rungen-gateway/secrets{{- end }}
{{- define "rungen-gateway.tlsDir" -}}/etc/rungen-gateway/tls{{- end }}
{{- define "rungen-gateway.clientCADir" -}}/etc/rungen-gateway/client-ca{{- end }}
{{- define "rungen-gateway.upstreamCADir" -}}/etc/rungen-gateway/upstream-ca{{- end }}

{{/*
Name of the Secret holding the RunGen API keys.
*/}}
{{- define "rungen-gateway.apiKeysSecretName" -}}
{{- if .Values.apiKeys.existingSecret }}
{{- .Values.apiKeys.existingSecret }}
{{- else }}
{{- printf "%s-api-keys" (include "rungen-gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
True (non-empty) when the client CA lives in its own Secret (not the TLS Secret).
*/}}
{{- define "rungen-gateway.separateClientCA" -}}
{{- if and .Values.tls.enabled .Values.tls.clientCA.enabled .Values.tls.clientCA.secretName (ne .Values.tls.clientCA.secretName .Values.tls.secretName) }}true{{- end }}
{{- end }}

{{/*
"host:port" for a listener: bindAddress and a port (IPv6 addresses get brackets).
Usage: include "rungen-gateway.listenAddr" (list . PORT)
*/}}
{{- define "rungen-gateway.listenAddr" -}}
{{- $root := index . 0 }}
{{- $port := index . 1 }}
{{- $host := $root.Values.bindAddress }}
{{- if contains ":" $host }}
{{- printf "[%s]:%d" $host (int $port) }}
{{- else }}
{{- printf "%s:%d" $host (int $port) }}
{{- end }}
{{- end }}

{{/*
A TOML inline table from a map with camelCase keys, e.g. {perSecond: 50, burst: 100} ->
{ burst = 100, per_second = 50 }. Null values are left out.
*/}}
{{- define "rungen-gateway.inlineTable" -}}
{{- $parts := list }}
{{- range $k, $v := . }}
{{- if not (kindIs "invalid" $v) }}
{{- $parts = append $parts (printf "%s = %s" (snakecase $k) (toJson $v)) }}
{{- end }}
{{- end }}
{{- printf "{ %s }" (join ", " $parts) }}
{{- end }}

{{/*
The public Service port: service.port, or 443 with TLS / 80 without.
*/}}
{{- define "rungen-gateway.servicePort" -}}
{{- if not (kindIs "invalid" .Values.service.port) }}
{{- .Values.service.port }}
{{- else if .Values.tls.enabled }}443
{{- else }}80
{{- end }}
{{- end }}

{{/*
The upstream's TCP port, from config.upstream.baseUrl.
*/}}
{{- define "rungen-gateway.upstreamPort" -}}
{{- $u := urlParse .Values.config.upstream.baseUrl }}
{{- $hostport := $u.host }}
{{- if regexMatch ":[0-9]+$" $hostport }}
{{- regexFind "[0-9]+$" $hostport }}
{{- else if eq $u.scheme "http" }}80
{{- else }}443
{{- end }}
{{- end }}

{{/*
The drain delay the gateway itself applies ([server] drain_delay), in seconds.
*/}}
{{- define "rungen-gateway.appDrainDelay" -}}
{{- if eq .Values.shutdown.drainIn "preStop" }}0{{ else }}{{ int .Values.shutdown.drainDelaySeconds }}{{ end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: given, or drain delay + drain deadline + 5 s. It must exceed the
drain delay + the drain deadline, or kubelet kills the gateway in the middle of its drain.
*/}}
{{- define "rungen-gateway.terminationGracePeriod" -}}
{{- $needed := add (int .Values.shutdown.drainDelaySeconds) (int .Values.shutdown.timeoutSeconds) }}
{{- if kindIs "invalid" .Values.shutdown.terminationGracePeriodSeconds }}
{{- add $needed 5 }}
{{- else }}
{{- $given := int .Values.shutdown.terminationGracePeriodSeconds }}
{{- if le $given $needed }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds (%d) must exceed shutdown.drainDelaySeconds + shutdown.timeoutSeconds (%d): kubelet would kill the gateway during its drain" $given $needed) }}
{{- end }}
{{- $given }}
{{- end }}
{{- end }}

{{/*
Everything the gateway reads only at start (a change needs a restart), hashed into the pod
template's checksum/restart-settings annotation. Everything else in the ConfigMap and the Secrets
(upstream, rate limits, teams, clients, admin token, API keys, certificate files) is hot reloaded
and deliberately left out, so editing it never rolls the pods.
*/}}
{{- define "rungen-gateway.restartSettings" -}}
{{- $s := dict
  "ports" .Values.ports
  "bindAddress" .Values.bindAddress
  "server" .Values.config.server
  "shutdown" .Values.shutdown
  "cache" .Values.config.cache
  "reload" .Values.config.reload
  "logging" .Values.config.logging
  "tls" .Values.tls
}}
{{- toJson $s }}
{{- end }}

{{/*
Render-time checks with a clear message (the gateway's own check-config covers the rest).
*/}}
{{- define "rungen-gateway.validate" -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret, e.g. written by a cert-manager Certificate)" }}
{{- end }}
{{- if and .Values.tls.plaintextListener (not .Values.tls.enabled) }}
{{- fail "tls.plaintextListener needs tls.enabled (without TLS the public port is already plaintext)" }}
{{- end }}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.enabled) }}
{{- fail "tls.clientCA.enabled needs tls.enabled" }}
{{- end }}
{{- if and (eq .Values.shutdown.drainIn "preStop") (semverCompare "<1.30.0-0" .Capabilities.KubeVersion.Version) }}
{{- fail (printf "shutdown.drainIn: preStop uses the preStop sleep action, which needs Kubernetes >= 1.30 (this is %s): use drainIn: app" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- if eq (int .Values.ports.http) (int .Values.ports.admin) }}
{{- fail "ports.http and ports.admin must differ: the admin API never shares the public port" }}
{{- end }}
{{- if and .Values.tls.plaintextListener (or (eq (int .Values.ports.plaintext) (int .Values.ports.http)) (eq (int .Values.ports.plaintext) (int .Values.ports.admin))) }}
{{- fail "ports.plaintext must differ from ports.http and ports.admin" }}
{{- end }}
{{- if eq .Values.ingress.servicePort "plaintext" }}
{{- if not .Values.tls.plaintextListener }}
{{- fail "ingress.servicePort: plaintext needs tls.plaintextListener" }}
{{- end }}
{{- end }}
{{- $names := dict }}
{{- range .Values.teams }}
{{- if hasKey $names .name }}
{{- fail (printf "teams: duplicate team name %q" .name) }}
{{- end }}
{{- $_ := set $names .name true }}
{{- end }}
{{- $_ := include "rungen-gateway.terminationGracePeriod" . }}
{{- end }}

{{/*
Teams whose API key is neither in apiKeys.existingSecret nor in apiKeys.keys (NOTES warns).
*/}}
{{- define "rungen-gateway.teamsWithoutKey" -}}
{{- if not .Values.apiKeys.existingSecret }}
{{- $missing := list }}
{{- range .Values.teams }}
{{- if not (get $.Values.apiKeys.keys (default .name .secretKey)) }}
{{- $missing = append $missing .name }}
{{- end }}
{{- end }}
{{- join ", " $missing }}
{{- end }}
{{- end }}
