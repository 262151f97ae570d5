{{/* Names ---------------------------------------------------------------------------------- */}}

{{- define "payos-workflows.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "payos-workflows.fullname" -}}
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

{{/* "<fullname>-<suffix>", kept within 63 characters. */}}
{{- define "payos-workflows.componentName" -}}
{{- $suffix := .suffix }}
{{- $base := include "payos-workflows.fullname" .root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $base $suffix }}
{{- end }}

{{- define "payos-workflows.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels --------------------------------------------------------------------------------- */}}

{{- define "payos-workflows.selectorLabelsDict" -}}
{{- toYaml (dict "app.kubernetes.io/name" (include "payos-workflows.name" .) "app.kubernetes.io/instance" .Release.Name) }}
{{- end }}

{{/* Labels of every object; commonLabels cannot replace the chart's own. */}}
{{- define "payos-workflows.labels" -}}
{{- $l := include "payos-workflows.selectorLabelsDict" . | fromYaml }}
{{- $_ := set $l "helm.sh/chart" (include "payos-workflows.chart" .) }}
{{- $_ = set $l "app.kubernetes.io/version" ((default .Chart.AppVersion .Values.image.tag) | trunc 63 | trimSuffix "-") }}
{{- $_ = set $l "app.kubernetes.io/managed-by" .Release.Service }}
{{- $_ = set $l "app.kubernetes.io/part-of" "payos-workflows" }}
{{- toYaml (merge $l (.Values.commonLabels | default dict)) }}
{{- end }}

{{- define "payos-workflows.selectorLabels" -}}
{{- include "payos-workflows.selectorLabelsDict" . }}
{{- end }}

{{/* Labels of one component: dict root, component, extra (map or nil: pod labels, which cannot
     replace the chart's own). */}}
{{- define "payos-workflows.componentLabels" -}}
{{- $l := include "payos-workflows.labels" .root | fromYaml }}
{{- $_ := set $l "app.kubernetes.io/component" .component }}
{{- toYaml (merge $l (.extra | default dict)) }}
{{- end }}

{{/* Selector labels of one component: dict root, component, extra (map or nil). */}}
{{- define "payos-workflows.componentSelectorLabels" -}}
{{- $l := include "payos-workflows.selectorLabelsDict" .root | fromYaml }}
{{- $_ := set $l "app.kubernetes.io/component" .component }}
{{- toYaml (merge $l (.extra | default dict)) }}
{{- end }}

{{/* Pod annotations: the checksums, then the component's, then the chart-wide ones (the first
     given wins on a shared key). dict root, v. */}}
{{- define "payos-workflows.podAnnotations" -}}
{{- $a := include "payos-workflows.checksums" .root | fromYaml }}
{{- toYaml (merge $a (.v.podAnnotations | default dict) (.root.Values.podAnnotations | default dict)) }}
{{- end }}

{{/* Referenced objects --------------------------------------------------------------------- */}}

{{- define "payos-workflows.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "payos-workflows.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The setup Job runs before the release's objects exist: it uses hook-scoped copies of the
     ServiceAccount, ConfigMap and Secret the chart creates (existing ones are used as they are). */}}
{{- define "payos-workflows.setupServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- include "payos-workflows.componentName" (dict "root" . "suffix" "setup") }}
{{- else }}
{{- include "payos-workflows.serviceAccountName" . }}
{{- end }}
{{- end }}

{{- define "payos-workflows.configName" -}}
{{- include "payos-workflows.componentName" (dict "root" . "suffix" "config") }}
{{- end }}

{{- define "payos-workflows.secretName" -}}
{{- default (include "payos-workflows.fullname" .) .Values.secret.existingSecret }}
{{- end }}

{{- define "payos-workflows.setupName" -}}
{{- include "payos-workflows.componentName" (dict "root" . "suffix" "setup") }}
{{- end }}

{{- define "payos-workflows.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The configuration file ----------------------------------------------------------------
     Every key is a key of the binary's FileConfig (crates/payos-workflows/src/config.rs, which
     refuses unknown keys); empty strings and nulls are left out so that the binary's default or
     the environment applies. Strings are quoted with toJson (a valid TOML basic string). */}}

{{- define "payos-workflows.tomlString" -}}
{{- toString . | toJson }}
{{- end }}

{{- define "payos-workflows.configToml" -}}
{{- $c := .Values.config -}}
# Rendered by the payos-workflows Helm chart from .Values.config; see examples/distributed.toml.
# Secrets (database_url, api.admin_token, payos.api_key) come from the environment.
{{- if not (kindIs "invalid" $c.database_max_connections) }}
database_max_connections = {{ $c.database_max_connections | int64 }}
{{- end }}

[kafka]
{{- with $c.kafka }}
{{- if .bootstrap }}
bootstrap = {{ include "payos-workflows.tomlString" .bootstrap }}
{{- end }}
{{- if .client_id }}
client_id = {{ include "payos-workflows.tomlString" .client_id }}
{{- end }}
{{- if not (kindIs "invalid" .partitions) }}
partitions = {{ .partitions | int64 }}
{{- end }}
{{- if not (kindIs "invalid" .replication) }}
replication = {{ .replication | int64 }}
{{- end }}
{{- if not (kindIs "invalid" .timeout_ms) }}
timeout_ms = {{ .timeout_ms | int64 }}
{{- end }}
{{- if .properties }}

[kafka.properties]
{{- range $k, $v := .properties }}
{{ include "payos-workflows.tomlString" $k }} = {{ include "payos-workflows.tomlString" $v }}
{{- end }}
{{- end }}
{{- end }}

[topics]
{{- with $c.topics }}
{{- if .prefix }}
prefix = {{ include "payos-workflows.tomlString" .prefix }}
{{- end }}
{{- if .transfer_events }}
transfer_events = {{ include "payos-workflows.tomlString" .transfer_events }}
{{- end }}
{{- if .names }}

[topics.names]
{{- range $k, $v := .names }}
{{ include "payos-workflows.tomlString" $k }} = {{ include "payos-workflows.tomlString" $v }}
{{- end }}
{{- end }}
{{- end }}

[api]
listen = {{ printf "0.0.0.0:%d" (.Values.api.containerPort | int) | toJson }}
{{- with $c.api }}
{{- if not (kindIs "invalid" .max_bulk_decisions) }}
max_bulk_decisions = {{ .max_bulk_decisions | int64 }}
{{- end }}
{{- if not (kindIs "invalid" .max_batch_triggers) }}
max_batch_triggers = {{ .max_batch_triggers | int64 }}
{{- end }}
{{- if not (kindIs "invalid" .decision_wait_ms) }}
decision_wait_ms = {{ .decision_wait_ms | int64 }}
{{- end }}
{{- end }}

[pools]
{{- if not (kindIs "invalid" $c.pools.members) }}
members = {{ $c.pools.members | int64 }}
{{- end }}

[engine]
{{- if and $c.engine (not (kindIs "invalid" $c.engine.inline_steps)) }}
inline_steps = [{{ range $i, $s := $c.engine.inline_steps }}{{ if $i }}, {{ end }}{{ include "payos-workflows.tomlString" $s }}{{ end }}]
{{- end }}

[payos]
{{- if $c.payos.api_url }}
api_url = {{ include "payos-workflows.tomlString" $c.payos.api_url }}
{{- end }}
{{- end }}

{{/* Data of the chart-created Secret: only the values given, so that a missing one leaves its
     variable unset and the binary names what it lacks. */}}
{{- define "payos-workflows.secretData" -}}
{{- $s := .Values.secret }}
{{- if $s.databaseUrl }}
{{ $s.keys.databaseUrl }}: {{ $s.databaseUrl | b64enc | quote }}
{{- end }}
{{- if $s.adminToken }}
{{ $s.keys.adminToken }}: {{ $s.adminToken | b64enc | quote }}
{{- end }}
{{- if $s.payosApiKey }}
{{ $s.keys.payosApiKey }}: {{ $s.payosApiKey | b64enc | quote }}
{{- end }}
{{- if $s.smtpUrl }}
{{ $s.keys.smtpUrl }}: {{ $s.smtpUrl | b64enc | quote }}
{{- end }}
{{- end }}

{{/* Annotations that roll the pods when the config file or the chart-created Secret change. */}}
{{- define "payos-workflows.checksums" -}}
checksum/config: {{ include "payos-workflows.configToml" . | sha256sum }}
{{- if not .Values.secret.existingSecret }}
checksum/secret: {{ include "payos-workflows.secretData" . | sha256sum }}
{{- end }}
{{- end }}

{{/* Pieces of a container ------------------------------------------------------------------ */}}

{{/* One variable from the Secret: dict root, name (variable), key (field of secret.keys). */}}
{{- define "payos-workflows.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "payos-workflows.secretName" .root }}
      key: {{ index .root.Values.secret.keys .key }}
      optional: true
{{- end }}

{{/* dict root, secretName (override, for the setup Job). */}}
{{- define "payos-workflows.databaseUrlEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .secretName | default (include "payos-workflows.secretName" .root) }}
      key: {{ .root.Values.secret.keys.databaseUrl }}
      optional: true
{{- end }}

{{- define "payos-workflows.command" -}}
{{- with .Values.image.command }}
command:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "payos-workflows.egressEnv" -}}
{{- with .Values.egressAllow }}
- name: WORKFLOWS_EGRESS_ALLOW
  value: {{ join "," . | quote }}
{{- end }}
{{- end }}

{{/* The pod-level placement of a component: dict root, v (the component's values). The
     component's own value replaces the chart-wide default when non-empty. */}}
{{- define "payos-workflows.placement" -}}
{{- $root := .root }}
{{- $v := .v }}
{{- with (default $root.Values.nodeSelector $v.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $root.Values.tolerations $v.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $root.Values.affinity $v.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $root.Values.topologySpreadConstraints $v.topologySpreadConstraints) }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $root.Values.priorityClassName $v.priorityClassName) }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* A Deployment of one process of the runtime.
     dict:
       root       the chart's root context
       component  app.kubernetes.io/component and name suffix ("api", "worker-action", ...)
       v          the component's values (replicas, resources, overrides)
       args       the subcommand and its flags, before --config
       env        extra container env (YAML list string), after the common variables
       ports      container ports (YAML list string) or ""
       probes     probes and lifecycle (YAML string) or ""
       labels     extra pod/selector labels (map) or nil */}}
{{- define "payos-workflows.deployment" -}}
{{- $root := .root }}
{{- $v := .v }}
{{- $name := include "payos-workflows.componentName" (dict "root" $root "suffix" .component) }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "payos-workflows.componentLabels" (dict "root" $root "component" .component "extra" .labels) | nindent 4 }}
spec:
  replicas: {{ $v.replicas | int64 }}
  {{- with $v.strategy }}
  strategy:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "payos-workflows.componentSelectorLabels" (dict "root" $root "component" .component "extra" .labels) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- $selector := include "payos-workflows.componentSelectorLabels" (dict "root" $root "component" .component "extra" .labels) | fromYaml }}
        {{- include "payos-workflows.componentLabels" (dict "root" $root "component" .component "extra" (merge $selector ($root.Values.podLabels | default dict))) | nindent 8 }}
      annotations:
        {{- include "payos-workflows.podAnnotations" (dict "root" $root "v" $v) | nindent 8 }}
    spec:
      serviceAccountName: {{ include "payos-workflows.serviceAccountName" $root }}
      automountServiceAccountToken: {{ $root.Values.serviceAccount.automountServiceAccountToken }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      terminationGracePeriodSeconds: {{ default $root.Values.terminationGracePeriodSeconds $v.terminationGracePeriodSeconds | int64 }}
      {{- with $root.Values.podSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (include "payos-workflows.placement" (dict "root" $root "v" $v) | trim) }}
      {{- . | nindent 6 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "payos-workflows.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          {{- with (include "payos-workflows.command" $root | trim) }}
          {{- . | nindent 10 }}
          {{- end }}
          args:
            {{- range .args }}
            - {{ . | quote }}
            {{- end }}
            - "--config"
            - "/etc/payos-workflows/config.toml"
          env:
            - name: RUST_LOG
              value: {{ $root.Values.logLevel | quote }}
            - name: MIMALLOC_PURGE_DELAY
              value: {{ $root.Values.allocator.purgeDelayMs | int64 | quote }}
            - name: WORKFLOWS_MAX_STEPS
              value: {{ $root.Values.limits.maxSteps | int64 | quote }}
            - name: WORKFLOWS_MAX_TEMPLATE_BYTES
              value: {{ $root.Values.limits.maxTemplateBytes | int64 | quote }}
            {{- if not (kindIs "invalid" $v.databaseMaxConnections) }}
            - name: WORKFLOWS_DB_MAX_CONNECTIONS
              value: {{ $v.databaseMaxConnections | int64 | quote }}
            {{- end }}
            {{- include "payos-workflows.databaseUrlEnv" (dict "root" $root) | nindent 12 }}
            {{- with .env }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with $root.Values.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- with .ports }}
          ports:
            {{- . | nindent 12 }}
          {{- end }}
          {{- with .probes }}
          {{- . | nindent 10 }}
          {{- end }}
          {{- with $v.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $root.Values.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          volumeMounts:
            - name: config
              mountPath: /etc/payos-workflows
              readOnly: true
            - name: tmp
              mountPath: /tmp
            {{- with $root.Values.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: config
          {{- include "payos-workflows.configVolume" (dict "root" $root "name" (include "payos-workflows.configName" $root)) | trim | nindent 10 }}
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
        {{- with $root.Values.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end }}

{{/* The volume source of the config file: dict root, name. */}}
{{- define "payos-workflows.configVolume" -}}
{{- if .root.Values.configInSecret }}
secret:
  secretName: {{ .name }}
  items:
    - key: config.toml
      path: config.toml
{{- else }}
configMap:
  name: {{ .name }}
  items:
    - key: config.toml
      path: config.toml
{{- end }}
{{- end }}

{{/* The config file object (ConfigMap, or Secret with configInSecret): dict root, name, hook
     (annotations of a hook copy, or nil). */}}
{{- define "payos-workflows.configObject" -}}
{{- $root := .root }}
apiVersion: v1
kind: {{ ternary "Secret" "ConfigMap" $root.Values.configInSecret }}
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "payos-workflows.labels" $root | nindent 4 }}
  {{- with .hook }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- if $root.Values.configInSecret }}
type: Opaque
stringData:
{{- else }}
data:
{{- end }}
  config.toml: |
    {{- include "payos-workflows.configToml" $root | nindent 4 }}
{{- end }}

{{/* An int-or-string value (1, or "50%"). */}}
{{- define "payos-workflows.intOrString" -}}
{{- if kindIs "string" . }}{{ quote . }}{{ else }}{{ . | int64 }}{{ end }}
{{- end }}

{{/* A container of the setup Job: dict root, c (name, args), secretName. */}}
{{- define "payos-workflows.setupContainer" -}}
{{- $root := .root }}
- name: {{ .c.name }}
  image: {{ include "payos-workflows.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  {{- with (include "payos-workflows.command" $root | trim) }}
  {{- . | nindent 2 }}
  {{- end }}
  args:
    {{- range .c.args }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: RUST_LOG
      value: {{ $root.Values.logLevel | quote }}
    {{- include "payos-workflows.databaseUrlEnv" (dict "root" $root "secretName" .secretName) | nindent 4 }}
    {{- with $root.Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $root.Values.setupJob.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: config
      mountPath: /etc/payos-workflows
      readOnly: true
    - name: tmp
      mountPath: /tmp
    {{- with $root.Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
