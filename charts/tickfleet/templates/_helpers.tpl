{{/* Chart name, overridable. */}}
{{- define "tickfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-tickfleet, or the release name when it already contains the chart name. */}}
{{- define "tickfleet.fullname" -}}
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

{{/* Name of the operator's objects. */}}
{{- define "tickfleet.operatorName" -}}
{{- printf "%s-operator" (include "tickfleet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tickfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the release that the operator's labels below do not cover. */}}
{{- define "tickfleet.commonLabels" -}}
helm.sh/chart: {{ include "tickfleet.chart" . }}
app.kubernetes.io/part-of: tickfleet
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels of the release's objects that are not the operator's (monitors, rules, dashboards, pipelines). */}}
{{- define "tickfleet.labels" -}}
{{ include "tickfleet.commonLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels selecting the operator pods (stable across upgrades: never add to these). */}}
{{- define "tickfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tickfleet.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tickfleet.operatorLabels" -}}
{{ include "tickfleet.commonLabels" . }}
{{ include "tickfleet.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "tickfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tickfleet.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image reference: repository@digest, or repository:tag (tag defaults to appVersion). */}}
{{- define "tickfleet.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Name of the leader-election Lease. */}}
{{- define "tickfleet.leaseName" -}}
{{- include "tickfleet.operatorName" . }}
{{- end }}
