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
{{- define "rungen-gateway.jwksDir" -}}/etc/rungen-gateway/jwks{{- end }}

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
Everything the gateway reads only at start (a reload that changes it only logs a warning), hashed
into the pod template's checksum/restart-settings annotation: the listen addresses (ports,
bindAddress, the plaintext listener), TLS settings, the header limits / connection caps / HTTP/2
streams / header_read_timeout / max_requests_per_connection / worker_threads, body_read_timeout
(its request-body half is hot reloaded, but its other half, how long a response may stall because
the client does not take it, is a connection setting read at start), shutdown_timeout,
the admin listener, [logging], [reload], the cache's size bounds and coalesce timeout, and [cluster] (including the
chart-held Redis URL; a Redis URL in an existing Secret is not visible here: roll the pods yourself
after changing it). Everything else (upstream, rate limits, teams, clients and their JWT keys and
token hashes, inline or in a Secret, the admin token, API keys, certificate files, cache route
policies, body size and URI limits, drain delay) is hot reloaded and deliberately left out, so editing it
never rolls the pods.
*/}}
{{- define "rungen-gateway.restartSettings" -}}
{{- $srv := .Values.config.server }}
{{- $cache := .Values.config.cache }}
{{- $s := dict
  "ports" .Values.ports
  "bindAddress" .Values.bindAddress
  "server" (dict
    "headerReadTimeout" $srv.headerReadTimeout
    "bodyReadTimeout" $srv.bodyReadTimeout
    "maxHeaderBytes" $srv.maxHeaderBytes
    "maxHeaders" $srv.maxHeaders
    "maxConnections" $srv.maxConnections
    "maxConnectionsPerIp" $srv.maxConnectionsPerIp
    "maxRequestsPerConnection" $srv.maxRequestsPerConnection
    "h2MaxConcurrentStreams" $srv.h2MaxConcurrentStreams
    "workerThreads" $srv.workerThreads)
  "shutdownTimeout" .Values.shutdown.timeoutSeconds
  "cache" (dict
    "maxBytes" $cache.maxBytes
    "maxEntryBytes" $cache.maxEntryBytes
    "coalesceTimeout" $cache.coalesceTimeout)
  "reload" .Values.config.reload
  "logging" .Values.config.logging
  "tls" .Values.tls
  "cluster" (ternary .Values.config.cluster (dict) (eq (include "rungen-gateway.clusterEnabled" .) "true"))
}}
{{- toJson $s }}
{{- end }}

{{/*
"true" when [cluster] is rendered (config.cluster.enabled).
*/}}
{{- define "rungen-gateway.clusterEnabled" -}}
{{- if .Values.config.cluster.enabled }}true{{ end }}
{{- end }}

{{/*
Redis key prefix: config.cluster.keyPrefix, or the release's full name (so two releases sharing
one Redis never share budgets or invalidations).
*/}}
{{- define "rungen-gateway.clusterKeyPrefix" -}}
{{- .Values.config.cluster.keyPrefix | default (include "rungen-gateway.fullname" .) }}
{{- end }}

{{/*
Name of the chart-created Secret for the Redis URL and JWT HMAC secrets given as values.
*/}}
{{- define "rungen-gateway.gatewaySecretName" -}}
{{- printf "%s-secrets" (include "rungen-gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Secret files besides the API keys, all mounted under /etc/rungen-gateway/secrets/<key>: the Redis
URL (config.cluster.redisUrl), each JWT client's HMAC secret (clients[].jwt.hmacSecret), from the
chart-created Secret (value) or an existing Secret, and each token hash kept in an existing Secret
(clients[].tokenSha256Secret). JSON: {"refs": [{what, secret, key, value, chart}]}.
*/}}
{{- define "rungen-gateway.extraSecretRefs" -}}
{{- $refs := list }}
{{- $chartSecret := include "rungen-gateway.gatewaySecretName" . }}
{{- if .Values.config.cluster.enabled }}
{{- $r := .Values.config.cluster.redisUrl | default dict }}
{{- $key := $r.key | default "redis-url" }}
{{- if $r.existingSecret }}
{{- $refs = append $refs (dict "what" "config.cluster.redisUrl" "secret" $r.existingSecret "key" $key "value" "" "chart" false) }}
{{- else }}
{{- $refs = append $refs (dict "what" "config.cluster.redisUrl" "secret" $chartSecret "key" $key "value" ($r.value | default "" | toString) "chart" true) }}
{{- end }}
{{- end }}
{{- range .Values.clients }}
{{- $client := . }}
{{- with .tokenSha256Secret }}
{{- $key := .key | default (printf "token-sha256-%s" $client.name) }}
{{- $refs = append $refs (dict "what" (printf "clients[%s].tokenSha256Secret" $client.name) "secret" .existingSecret "key" $key "value" "" "chart" false) }}
{{- end }}
{{- if and .jwt .jwt.hmacSecret }}
{{- $h := .jwt.hmacSecret }}
{{- $key := $h.key | default (printf "jwt-%s" $client.name) }}
{{- $what := printf "clients[%s].jwt.hmacSecret" $client.name }}
{{- if $h.existingSecret }}
{{- $refs = append $refs (dict "what" $what "secret" $h.existingSecret "key" $key "value" "" "chart" false) }}
{{- else }}
{{- $refs = append $refs (dict "what" $what "secret" $chartSecret "key" $key "value" ($h.value | default "" | toString) "chart" true) }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson (dict "refs" $refs) }}
{{- end }}

{{/*
Path of a secret file (a key under /etc/rungen-gateway/secrets).
*/}}
{{- define "rungen-gateway.secretFile" -}}
{{- printf "%s/%s" (include "rungen-gateway.secretsDir" .root) .key }}
{{- end }}

{{/*
Sources of the projected `secrets` volume (/etc/rungen-gateway/secrets): the whole API-key Secret,
the whole chart-created Secret (when it exists), and the needed keys of other existing Secrets
(grouped per Secret, each key once; keys of the two whole Secrets are not repeated).
*/}}
{{- define "rungen-gateway.secretSources" -}}
{{- $apiSecret := include "rungen-gateway.apiKeysSecretName" . }}
{{- $chartSecret := include "rungen-gateway.gatewaySecretName" . }}
{{- $refs := (include "rungen-gateway.extraSecretRefs" . | fromJson).refs }}
{{- $hasChart := false }}
{{- $external := dict }}
{{- $order := list }}
{{- range $refs }}
{{- if .chart }}
{{- $hasChart = true }}
{{- else if ne .secret $apiSecret }}
{{- if not (hasKey $external .secret) }}
{{- $_ := set $external .secret list }}
{{- $order = append $order .secret }}
{{- end }}
{{- if not (has .key (get $external .secret)) }}
{{- $_ := set $external .secret (append (get $external .secret) .key) }}
{{- end }}
{{- end }}
{{- end }}
- secret:
    name: {{ $apiSecret }}
{{- if $hasChart }}
- secret:
    name: {{ $chartSecret }}
{{- end }}
{{- range $order }}
- secret:
    name: {{ . }}
    items:
      {{- range get $external . }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
{{- end }}
{{- end }}

{{/*
JWT clients whose JWKS document comes from a ConfigMap key (clients[].jwt.jwksConfigMap), mounted
as /etc/rungen-gateway/jwks/<client name>.json.
*/}}
{{- define "rungen-gateway.jwksClients" -}}
{{- $names := list }}
{{- range .Values.clients }}
{{- if and .jwt .jwt.jwksConfigMap }}
{{- $names = append $names .name }}
{{- end }}
{{- end }}
{{- join "," $names }}
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
{{- if .Values.config.cluster.enabled }}
{{- $r := .Values.config.cluster.redisUrl | default dict }}
{{- if and (not $r.existingSecret) (not $r.value) }}
{{- fail "config.cluster.enabled needs config.cluster.redisUrl.existingSecret (recommended) or config.cluster.redisUrl.value (redis://host:port or rediss://host:port)" }}
{{- end }}
{{- if and $r.value (not (regexMatch "^rediss?://" (toString $r.value))) }}
{{- fail "config.cluster.redisUrl.value must be a redis://host:port or rediss://host:port URL" }}
{{- end }}
{{- end }}
{{- $clientNames := dict }}
{{- range .Values.clients }}
{{- $cname := .name }}
{{- if hasKey $clientNames .name }}
{{- fail (printf "clients: duplicate client name %q" .name) }}
{{- end }}
{{- $_ := set $clientNames .name true }}
{{- $kinds := list }}
{{- if and .tokenSha256 .tokenSha256Secret }}
{{- fail (printf "clients[%s]: give the token hash either inline (tokenSha256) or from a Secret (tokenSha256Secret), not both" .name) }}
{{- end }}
{{- if and .tokenSha256Secret (not .tokenSha256Secret.existingSecret) }}
{{- fail (printf "clients[%s].tokenSha256Secret needs existingSecret (the Secret holding the hash under key)" .name) }}
{{- end }}
{{- if or .tokenSha256 .tokenSha256Secret .certNames }}{{ $kinds = append $kinds "tokenSha256/tokenSha256Secret/certNames" }}{{ end }}
{{- if .public }}{{ $kinds = append $kinds "public: true" }}{{ end }}
{{- if .jwt }}{{ $kinds = append $kinds "jwt" }}{{ end }}
{{- if gt (len $kinds) 1 }}
{{- fail (printf "clients[%s]: a client is one of token/certificate (tokenSha256 or tokenSha256Secret, certNames), public: true, or jwt; it has %s" .name (join " and " $kinds)) }}
{{- end }}
{{- if eq (len $kinds) 0 }}
{{- fail (printf "clients[%s]: needs tokenSha256, tokenSha256Secret, certNames, public: true or jwt" .name) }}
{{- end }}
{{- if and .public (not .allowedOrigins) }}
{{- fail (printf "clients[%s]: a public client is matched by Origin: list at least one in allowedOrigins" .name) }}
{{- end }}
{{- if and .ipRateLimit (not .public) }}
{{- fail (printf "clients[%s]: only public clients have an ipRateLimit" .name) }}
{{- end }}
{{- with .jwt }}
{{- $sources := 0 }}
{{- if .hmacSecret }}{{ $sources = add1 $sources }}{{ end }}
{{- if .jwksUrl }}{{ $sources = add1 $sources }}{{ end }}
{{- if .jwksConfigMap }}{{ $sources = add1 $sources }}{{ end }}
{{- if ne (int $sources) 1 }}
{{- fail (printf "clients[%s].jwt: give exactly one of hmacSecret, jwksUrl or jwksConfigMap" $cname) }}
{{- end }}
{{- if and .hmacSecret (not .hmacSecret.existingSecret) (not .hmacSecret.value) }}
{{- fail (printf "clients[%s].jwt.hmacSecret needs existingSecret (recommended) or value (at least 32 bytes)" $cname) }}
{{- end }}
{{- if and .hmacSecret .hmacSecret.value (not .hmacSecret.existingSecret) (lt (len (toString .hmacSecret.value)) 32) }}
{{- fail (printf "clients[%s].jwt.hmacSecret.value must be at least 32 bytes" $cname) }}
{{- end }}
{{- end }}
{{- end }}
{{- /* Every file under /etc/rungen-gateway/secrets must come from exactly one Secret key. */}}
{{- $files := dict }}
{{- $apiSecret := include "rungen-gateway.apiKeysSecretName" . }}
{{- range .Values.teams }}
{{- $_ := set $files (default .name .secretKey) (printf "%s/%s (teams[%s])" $apiSecret (default .name .secretKey) .name) }}
{{- end }}
{{- range (include "rungen-gateway.extraSecretRefs" . | fromJson).refs }}
{{- $id := printf "%s/%s (%s)" .secret .key .what }}
{{- if hasKey $files .key }}
{{- $other := get $files .key }}
{{- if ne (regexReplaceAll " \\(.*" $other "") (printf "%s/%s" .secret .key) }}
{{- fail (printf "two secrets would both be mounted as /etc/rungen-gateway/secrets/%s: %s and %s; set a different key (teams[].secretKey, config.cluster.redisUrl.key, clients[].jwt.hmacSecret.key, clients[].tokenSha256Secret.key)" .key $other $id) }}
{{- end }}
{{- if .chart }}
{{- fail (printf "two secrets would both be mounted as /etc/rungen-gateway/secrets/%s: %s and %s" .key $other $id) }}
{{- end }}
{{- end }}
{{- $_ := set $files .key $id }}
{{- end }}
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

{{/*
The Service that carries the admin port: the main one when it is a ClusterIP Service, else a
ClusterIP Service of its own (the admin API is never on a load balancer or a node port).
*/}}
{{- define "rungen-gateway.adminService" -}}
{{- if eq .Values.service.type "ClusterIP" }}
{{- include "rungen-gateway.fullname" . }}
{{- else }}
{{- printf "%s-admin" (include "rungen-gateway.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}
{{- end }}
