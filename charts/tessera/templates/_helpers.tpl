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

{{/* The runtime the operator's InferenceServices use (serving.runtime): its values, by kind. */}}
{{- define "tessera.servingRuntimeName" -}}
{{- $runtime := index .Values.serving .Values.serving.runtime -}}
{{- if not $runtime.enabled -}}
{{- fail (printf "serving.runtime is %s but serving.%s.enabled is false" .Values.serving.runtime .Values.serving.runtime) -}}
{{- end -}}
{{- $runtime.name -}}
{{- end -}}

{{/* Where the adapter agent puts adapters; the runtime container mounts the same volume at the same path. */}}
{{- define "tessera.adaptersDir" -}}/mnt/adapters{{- end -}}

{{/* The container securityContext every Tessera container runs with. */}}
{{- define "tessera.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The adapter agent sidecar of a ServingRuntime; call with (dict "root" $ "kind" "vllm"|"tessera"). */}}
{{- define "tessera.adapterAgent" -}}
{{- $ := .root -}}
{{- $serving := $.Values.serving -}}
- name: adapter-agent
  image: {{ include "tessera.image" (dict "root" $ "name" "operator") }}
  imagePullPolicy: {{ $.Values.images.operator.pullPolicy }}
  command: [tessera, adapter-agent]
  args:
  - --runtime={{ .kind }}
  - --runtime-url=http://127.0.0.1:{{ $serving.port }}
  - --adapters-dir={{ include "tessera.adaptersDir" $ }}
  - --host=0.0.0.0
  - --port={{ $serving.agent.port }}
  - --max-lora-rank={{ $serving.maxLoraRank }}
  {{- range $serving.targetModules }}
  - --target-module={{ . }}
  {{- end }}
  {{- range ($serving.allowedPrefixes | default (list $.Values.store.uri)) }}
  - --allowed-prefix={{ . }}
  {{- end }}
  {{- if $.Values.tenancy.enabled }}
  {{- /* Adapters only from the pod namespace's prefixes or the shared ones (POD_NAMESPACE, below). */}}
  {{- range (include "tessera.tenancyRoots" $ | fromJsonArray) }}
  - --store-root={{ . }}
  {{- end }}
  {{- range $.Values.tenancy.sharedPrefixes }}
  - --shared-prefix={{ . }}
  {{- end }}
  {{- end }}
  - --resync-seconds={{ $serving.agent.resyncSeconds }}
  env:
  {{- include "tessera.storeEnv" $ | nindent 2 }}
  - name: HOME
    value: /tmp
  - name: POD_NAMESPACE
    valueFrom:
      fieldRef:
        fieldPath: metadata.namespace
  envFrom:
  # The store credentials: the agent alone fetches adapters; the runtime never sees them.
  - secretRef:
      name: {{ $.Values.store.existingSecret }}
  ports:
  - name: adapter-api
    containerPort: {{ $serving.agent.port }}
    protocol: TCP
  livenessProbe:
    httpGet:
      path: /healthz
      port: adapter-api
    periodSeconds: 15
    timeoutSeconds: 5
  readinessProbe:
    httpGet:
      path: /healthz
      port: adapter-api
    periodSeconds: 10
  resources:
    {{- toYaml $serving.agent.resources | nindent 4 }}
  securityContext:
    {{- include "tessera.containerSecurityContext" $ | nindent 4 }}
  volumeMounts:
  - name: adapters
    mountPath: {{ include "tessera.adaptersDir" $ }}
{{- end -}}

{{/* requests/limits of a runtime container with its GPUs; call with (dict "root" $ "runtime" .). */}}
{{- define "tessera.runtimeResources" -}}
{{- $gpus := ternary (dict .root.Values.gpu.resourceName (toString .runtime.gpus)) dict (gt (int .runtime.gpus) 0) -}}
requests:
  {{- merge (deepCopy .runtime.resources.requests) $gpus | toYaml | nindent 2 }}
limits:
  {{- merge (deepCopy (.runtime.resources.limits | default dict)) $gpus | toYaml | nindent 2 }}
{{- end -}}

{{/* What every Tessera ServingRuntime shares: labels, pull secrets, the GPU pool's placement when
     it uses GPUs. Call with (dict "root" $ "runtime" .). */}}
{{- define "tessera.runtimePodFields" -}}
{{- $ := .root -}}
# Put on every predictor pod: the NetworkPolicies and the ServiceMonitor select by them.
labels:
  {{- include "tessera.predictor.selectorLabels" $ | nindent 2 }}
annotations:
  prometheus.kserve.io/port: {{ $.Values.serving.port | quote }}
  prometheus.kserve.io/path: /metrics
{{- with $.Values.global.imagePullSecrets }}
imagePullSecrets:
  {{- include "tessera.imagePullSecrets" $ | nindent 2 }}
{{- end }}
{{- if gt (int .runtime.gpus) 0 }}
{{- with $.Values.gpuNodePool.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $.Values.gpuNodePool.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Egress rules to DNS, the store and (with "apiServer" true) the Kubernetes API server. */}}
{{- define "tessera.egressToDnsApiAndStore" -}}
{{- $np := .root.Values.networkPolicy -}}
- ports:
  - {protocol: UDP, port: 53}
  - {protocol: TCP, port: 53}
{{- if .apiServer }}
- ports:
  {{- range $np.apiServer.ports }}
  - {protocol: TCP, port: {{ . }}}
  {{- end }}
  {{- with $np.apiServer.cidrs }}
  to:
  {{- range . }}
  - ipBlock: {cidr: {{ . }}}
  {{- end }}
  {{- end }}
{{- end }}
- ports:
  - {protocol: TCP, port: {{ $np.store.port }}}
  {{- with $np.store.peers }}
  to:
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* The ConfigMap, in every job namespace, that carries tessera/access (access control and the
     adapter API guard) into vLLM's pods. */}}
{{- define "tessera.vllmAccessConfigMap" -}}tessera-vllm-access{{- end -}}

{{/* Inference access settings of a runtime container, as the environment vLLM's middleware reads
     (tessera serve takes the same as flags). */}}
{{- define "tessera.accessEnv" -}}
- name: TESSERA_AUTH_MODE
  value: {{ .Values.auth.mode | quote }}
{{- if eq .Values.auth.mode "keys" }}
- name: TESSERA_API_KEYS
  value: /etc/tessera/keys/keys.json
{{- end }}
- name: TESSERA_QUOTAS
  value: /etc/tessera/quotas/quotas.json
{{- if .Values.audit.includeContent }}
- name: TESSERA_AUDIT_INCLUDE_CONTENT
  value: "true"
{{- end }}
{{- end -}}

{{/* The quota ConfigMap and, in keys mode, the keys Secret, as a runtime container's mounts. */}}
{{- define "tessera.accessMounts" -}}
- name: quotas
  mountPath: /etc/tessera/quotas
  readOnly: true
{{- if eq .Values.auth.mode "keys" }}
- name: api-keys
  mountPath: /etc/tessera/keys
  readOnly: true
{{- end }}
{{- end -}}

{{- define "tessera.accessVolumes" -}}
- name: quotas
  configMap:
    name: tessera-quotas
{{- if eq .Values.auth.mode "keys" }}
- name: api-keys
  secret:
    secretName: {{ .Values.auth.keysSecret }}
{{- end }}
{{- end -}}

{{/* The store roots tenants share (tenancy.storeRoots, else store.uri), without a trailing '/', as JSON. */}}
{{- define "tessera.tenancyRoots" -}}
{{- $roots := list -}}
{{- range (.Values.tenancy.storeRoots | default (list .Values.store.uri)) -}}
{{- $roots = append $roots (trimSuffix "/" .) -}}
{{- end -}}
{{- toJson $roots -}}
{{- end -}}
