{{/*
Expand the name of the chart.
*/}}
{{- define "faktory-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "faktory-gateway.fullname" -}}
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
Create chart name and version as used by the chart label.
*/}}
{{- define "faktory-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "faktory-gateway.labels" -}}
helm.sh/chart: {{ include "faktory-gateway.chart" . }}
{{ include "faktory-gateway.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: gateway
{{- end }}

{{/*
Selector labels
*/}}
{{- define "faktory-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "faktory-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "faktory-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "faktory-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The container image: repository:tag (tag defaults to the chart's appVersion), @digest when given.
*/}}
{{- define "faktory-gateway.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion | toString }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
Whether the gateway gets a Redis URL (shared batch ledger). Without one it keeps batch state in its
own memory, which is only valid for a single gateway in front of a Faktory server.
*/}}
{{- define "faktory-gateway.hasRedis" -}}
{{- if or .Values.redis.existingSecret .Values.redis.url }}true{{ end }}
{{- end }}

{{/*
The Secret holding the Redis URL, and its key: the user's existing Secret, or the one this chart
makes from redis.url.
*/}}
{{- define "faktory-gateway.redisSecretName" -}}
{{- if .Values.redis.existingSecret }}
{{- .Values.redis.existingSecret }}
{{- else }}
{{- printf "%s-redis" (include "faktory-gateway.fullname" .) }}
{{- end }}
{{- end }}

{{- define "faktory-gateway.redisSecretKey" -}}
{{- if .Values.redis.existingSecret }}
{{- .Values.redis.existingSecretKey }}
{{- else -}}
redis-url
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds for the gateway's pod: above shutdown.maxDelaySeconds, so the
gateway's own drain always ends before the kubelet's SIGKILL. Default: maxDelaySeconds + 5.
*/}}
{{- define "faktory-gateway.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (int .Values.shutdown.maxDelaySeconds) 5 }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
Checks the schema cannot express. Renders nothing, or fails the render with a message.
*/}}
{{- define "faktory-gateway.validate" -}}
{{- $max := int .Values.shutdown.maxDelaySeconds }}
{{- if gt (int .Values.shutdown.minDelaySeconds) $max }}
{{- fail (printf "shutdown.minDelaySeconds (%d) must not be greater than shutdown.maxDelaySeconds (%d)" (int .Values.shutdown.minDelaySeconds) $max) }}
{{- end }}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) }}
{{- if le (int .Values.terminationGracePeriodSeconds) $max }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than shutdown.maxDelaySeconds (%d), or the kubelet kills the gateway in the middle of its drain" (int .Values.terminationGracePeriodSeconds) $max) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
One environment value as the gateway parses it. Helm reads every YAML number as a float, and
`toString` would print 16777216 as 1.6777216e+07, which the gateway rejects: whole numbers are
printed as integers.
*/}}
{{- define "faktory-gateway.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}
{{- printf "%d" (int64 .) }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
The gateway's environment. Arguments (a dict):
  root       the chart's context
  listenHost the data port's address: 0.0.0.0 (shared Deployment) or 127.0.0.1 (sidecar)
  minDelay   shutdown.min_delay in seconds
Every key of .Values.config becomes FAKTORY_GATEWAY_<KEY>, nested keys joined by "_", upper-cased:
the same names the gateway documents. Keys set to null are left out (the gateway's default applies).
*/}}
{{- define "faktory-gateway.env" -}}
{{- $root := .root -}}
- name: FAKTORY_GATEWAY_LISTEN
  value: {{ printf "%s:%d" .listenHost (int $root.Values.ports.faktory) | quote }}
- name: FAKTORY_GATEWAY_HTTP_LISTEN
  value: {{ printf "0.0.0.0:%d" (int $root.Values.ports.http) | quote }}
- name: FAKTORY_GATEWAY_SHUTDOWN_MIN_DELAY
  value: {{ printf "%ds" (int .minDelay) | quote }}
- name: FAKTORY_GATEWAY_SHUTDOWN_MAX_DELAY
  value: {{ printf "%ds" (int $root.Values.shutdown.maxDelaySeconds) | quote }}
- name: FAKTORY_GATEWAY_SHUTDOWN_EXIT_ZERO_ON_SIGTERM
  value: {{ $root.Values.shutdown.exitZeroOnSigterm | toString | quote }}
{{- if include "faktory-gateway.hasRedis" $root }}
- name: FAKTORY_GATEWAY_REDIS
  valueFrom:
    secretKeyRef:
      name: {{ include "faktory-gateway.redisSecretName" $root }}
      key: {{ include "faktory-gateway.redisSecretKey" $root }}
{{- end }}
{{- range $key, $value := $root.Values.config }}
{{- if kindIs "map" $value }}
{{- range $subkey, $subvalue := $value }}
{{- if not (kindIs "invalid" $subvalue) }}
- name: {{ printf "FAKTORY_GATEWAY_%s_%s" $key $subkey | upper }}
  value: {{ include "faktory-gateway.envValue" $subvalue | quote }}
{{- end }}
{{- end }}
{{- else if not (kindIs "invalid" $value) }}
- name: {{ printf "FAKTORY_GATEWAY_%s" $key | upper }}
  value: {{ include "faktory-gateway.envValue" $value | quote }}
{{- end }}
{{- end }}
{{- with $root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
One HTTP probe. Arguments: path, port (name), settings (the values block; "enabled" is dropped).
*/}}
{{- define "faktory-gateway.probe" -}}
httpGet:
  path: {{ .path }}
  port: {{ .port }}
{{- with omit .settings "enabled" }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Everything of the gateway's container but its name, shared by the Deployment and the sidecar.
Arguments (a dict): root, listenHost, minDelay (see faktory-gateway.env), portPrefix (port names
are unique within a pod: the sidecar's are prefixed so they cannot clash with the app's).
*/}}
{{- define "faktory-gateway.containerSpec" -}}
{{- $root := .root }}
{{- $http := printf "%shttp" .portPrefix -}}
image: {{ include "faktory-gateway.image" $root | quote }}
imagePullPolicy: {{ $root.Values.image.pullPolicy }}
{{- with $root.Values.extraArgs }}
args:
  {{- toYaml . | nindent 2 }}
{{- end }}
ports:
  - name: {{ printf "%sfaktory" .portPrefix }}
    containerPort: {{ int $root.Values.ports.faktory }}
    protocol: TCP
  - name: {{ $http }}
    containerPort: {{ int $root.Values.ports.http }}
    protocol: TCP
env:
  {{- include "faktory-gateway.env" . | nindent 2 }}
startupProbe:
  {{- include "faktory-gateway.probe" (dict "path" "/startup" "port" $http "settings" $root.Values.startupProbe) | nindent 2 }}
livenessProbe:
  {{- include "faktory-gateway.probe" (dict "path" "/liveness" "port" $http "settings" $root.Values.livenessProbe) | nindent 2 }}
{{- if $root.Values.readinessProbe.enabled }}
readinessProbe:
  {{- include "faktory-gateway.probe" (dict "path" "/readiness" "port" $http "settings" $root.Values.readinessProbe) | nindent 2 }}
{{- end }}
{{- with $root.Values.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.extraVolumeMounts }}
volumeMounts:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The gateway as a Kubernetes native sidecar: one `initContainers` list entry with
`restartPolicy: Always`. The kubelet starts it before the app's containers, waits for its
startupProbe, keeps it running as long as the pod, and stops it only after the app's containers
have stopped: so it needs no shutdown.min_delay (always 0 here).

Use it from your own chart, with this chart as a dependency (values under `faktory-gateway:`,
deployment.enabled: false):

    spec:
      initContainers:
        {{- include "faktory-gateway.sidecar" (index .Subcharts "faktory-gateway") | nindent 8 }}
      containers:
        - name: app
          env:
            - name: FAKTORY_URL
              value: tcp://localhost:7419

The argument is this chart's own context: `.Subcharts` gives a parent chart the context of its
dependency (values, release, chart), so the names of Secrets match what this chart created.
*/}}
{{- define "faktory-gateway.sidecar" -}}
{{- include "faktory-gateway.validate" . -}}
- name: {{ .Values.sidecar.name }}
  restartPolicy: Always
  {{- include "faktory-gateway.containerSpec" (dict "root" . "listenHost" .Values.sidecar.listenHost "minDelay" 0 "portPrefix" "fgw-") | nindent 2 }}
{{- end }}
