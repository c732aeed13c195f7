{{/* Names, labels and the checks every template shares. */}}

{{- define "ferry.fullname" -}}
{{- $name := default "ferry" .Values.nameOverride -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The operator's ServiceAccount: the chart's own, or one you made (IRSA, Workload Identity). */}}
{{- define "ferry.operatorServiceAccount" -}}
{{- if .Values.operator.serviceAccount.name -}}
{{- .Values.operator.serviceAccount.name -}}
{{- else if .Values.operator.serviceAccount.create -}}
{{- printf "%s-operator" (include "ferry.fullname" .) -}}
{{- else -}}
{{- fail "operator.serviceAccount.name is required when operator.serviceAccount.create is false" -}}
{{- end -}}
{{- end -}}

{{- define "ferry.labels" -}}
app.kubernetes.io/name: ferry
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ferry.selector" -}}
app.kubernetes.io/name: ferry
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ferry.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The class both components serve. */}}
{{- define "ferry.class" -}}
{{- default (printf "ferry.dev/%s" .Values.provider) .Values.loadBalancerClass -}}
{{- end -}}

{{/* "true" when the forwarder DaemonSet is installed. */}}
{{- define "ferry.forwarder.enabled" -}}
{{- if eq (toString .Values.forwarder.enabled) "" -}}
{{- eq .Values.provider "local" -}}
{{- else -}}
{{- .Values.forwarder.enabled -}}
{{- end -}}
{{- end -}}

{{/* Bad values fail the install with one line, before anything reaches the cluster. */}}
{{- define "ferry.validate" -}}
{{- if not (has .Values.provider (list "local" "aws" "gce")) -}}
{{- fail (printf "provider must be local, aws or gce, not %q" .Values.provider) -}}
{{- end -}}
{{- if and (ne .Values.provider "local") (not .Values.clusterId) -}}
{{- fail (printf "clusterId is required with provider %s (it tags everything ferry creates)" .Values.provider) -}}
{{- end -}}
{{- if and (eq .Values.provider "gce") (or (not .Values.gce.project) (not .Values.gce.region)) -}}
{{- fail "gce.project and gce.region are required with provider gce" -}}
{{- end -}}
{{- if .Values.operator.aws -}}
{{- fail "operator.aws moved to aws (e.g. --set aws.region=eu-west-1): each provider's settings sit under its name" -}}
{{- end -}}
{{- if not (has .Values.forwarder.mode (list "auto" "kernel" "userspace")) -}}
{{- fail (printf "forwarder.mode must be auto, kernel or userspace, not %q" .Values.forwarder.mode) -}}
{{- end -}}
{{- range .Values.pools -}}
{{- if not .name -}}
{{- fail "every entry of pools needs a name" -}}
{{- end -}}
{{- if not .addresses -}}
{{- fail (printf "pool %s needs addresses" .name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
