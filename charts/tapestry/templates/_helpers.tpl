{{/* Names, labels and the lists every template shares. */}}

{{- define "tapestry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tapestry.fullname" -}}
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

{{- define "tapestry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The recommended labels on every object of the release. */}}
{{- define "tapestry.labels" -}}
helm.sh/chart: {{ include "tapestry.chart" . }}
app.kubernetes.io/name: {{ include "tapestry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tapestry
{{- end }}

{{/* What selects the operator's pod (stable across upgrades: no version). */}}
{{- define "tapestry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tapestry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "tapestry.minio.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tapestry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: minio
{{- end }}

{{- define "tapestry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tapestry.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tapestry.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The watched namespaces, one per line: watchNamespaces, or the release namespace. */}}
{{- define "tapestry.namespaces" -}}
{{- $namespaces := .Values.watchNamespaces | default (list .Release.Namespace) | uniq }}
{{- range $namespaces }}
{{ . }}
{{- end }}
{{- end }}

{{- define "tapestry.namespaceList" -}}
{{- compact (splitList "\n" (include "tapestry.namespaces" .)) | toJson }}
{{- end }}

{{- define "tapestry.coordinator" -}}
{{- if has .Values.role (list "coordinator" "both") }}true{{ end }}
{{- end }}

{{- define "tapestry.participant" -}}
{{- if has .Values.role (list "participant" "both") }}true{{ end }}
{{- end }}

{{- define "tapestry.minio.fullname" -}}
{{- printf "%s-minio" (include "tapestry.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tapestry.minio.secretName" -}}
{{- default (include "tapestry.minio.fullname" .) .Values.minio.auth.existingSecret }}
{{- end }}

{{- define "tapestry.minio.endpoint" -}}
{{- printf "http://%s.%s.svc:%d" (include "tapestry.minio.fullname" .) .Release.Namespace (int .Values.minio.port) }}
{{- end }}
