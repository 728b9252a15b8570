{{/* Names, labels, images and namespace lists shared by every template. */}}

{{- define "tessera.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tessera.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tessera
{{- end -}}

{{- define "tessera.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels the ClusterServingRuntime puts on every predictor pod: NetworkPolicies and the
     ServiceMonitor find Tessera's predictors by them, and nothing else's. */}}
{{- define "tessera.predictor.selectorLabels" -}}
app.kubernetes.io/part-of: tessera
app.kubernetes.io/component: predictor
{{- end -}}

{{- define "tessera.operator.serviceAccountName" -}}
{{- default (include "tessera.fullname" .) .Values.operator.serviceAccount.name -}}
{{- end -}}

{{/* "registry/repository:tag@digest" for one entry of .Values.images; global.imageRegistry wins. */}}
{{- define "tessera.image" -}}
{{- $image := index .root.Values.images .name -}}
{{- $registry := default $image.registry .root.Values.global.imageRegistry | trimSuffix "/" -}}
{{- $ref := printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) -}}
{{- if $image.digest -}}{{- $ref = printf "%s@%s" $ref $image.digest -}}{{- end -}}
{{- if $registry -}}{{ printf "%s/%s" $registry $ref }}{{- else -}}{{ $ref }}{{- end -}}
{{- end -}}

{{- define "tessera.imagePullSecrets" -}}
{{- $secrets := list -}}
{{- range .Values.global.imagePullSecrets -}}
{{- $secrets = append $secrets (dict "name" .) -}}
{{- end -}}
{{- toYaml $secrets -}}
{{- end -}}

{{/* The namespaces the operator watches, as a JSON list; empty means all namespaces. */}}
{{- define "tessera.watchNamespaces" -}}
{{- .Values.watchNamespaces | uniq | toJson -}}
{{- end -}}

{{/* The namespaces where FineTuneJobs run (see values.yaml: jobNamespaces), as a JSON list. */}}
{{- define "tessera.jobNamespaces" -}}
{{- $namespaces := .Values.jobNamespaces | default .Values.watchNamespaces | default (list .Release.Namespace) -}}
{{- $namespaces | uniq | toJson -}}
{{- end -}}

{{/* The store endpoint's settings as container env, on top of what the store Secret carries
     (env wins over envFrom). */}}
{{- define "tessera.storeEnv" -}}
{{- with .Values.store.endpoint -}}
- name: S3_ENDPOINT
  value: {{ . | quote }}
{{ end -}}
- name: S3_USE_HTTPS
  value: {{ ternary "1" "0" .Values.store.useHttps | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.store.region | quote }}
{{- end -}}

{{- /* The training kinds this installation runs (training.launcher first), as a JSON array. */ -}}
{{- define "tessera.launchers" -}}
{{- $launchers := list .Values.training.launcher -}}
{{- range .Values.training.otherLaunchers }}
{{- $launchers = append $launchers . -}}
{{- end -}}
{{- $launchers | uniq | toJson -}}
{{- end -}}
