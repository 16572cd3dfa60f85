{{/* Names and labels. */}}
{{- define "tokenmill.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tokenmill.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "tokenmill.versionLabels" . }}
{{- end -}}

{{/* The labels beside the selector ones. */}}
{{- define "tokenmill.versionLabels" -}}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one engine tier: (dict "root" $ "tier" $tier) */}}
{{- define "tokenmill.engineSelector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: engine
tokenmill.io/tier: {{ .tier.name }}
{{- end -}}

{{- define "tokenmill.routerSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: router
{{- end -}}

{{- define "tokenmill.engineName" -}}
{{- printf "%s-%s" (include "tokenmill.fullname" .root) .tier.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tokenmill.authSecret" -}}
{{- if .Values.auth.existingSecret -}}{{ .Values.auth.existingSecret }}{{- else -}}{{ include "tokenmill.fullname" . }}-auth{{- end -}}
{{- end -}}

{{- define "tokenmill.modelsClaim" -}}
{{- $volume := default dict .tier.model.volume -}}
{{- if $volume.claimName -}}{{ $volume.claimName }}{{- else -}}{{ include "tokenmill.engineName" . }}-models{{- end -}}
{{- end -}}

{{/* The model argument of `tokenmill serve` (empty: the bundled model). */}}
{{- define "tokenmill.modelArg" -}}
{{- if ne .tier.model.source "bundled" -}}
{{- $volume := default dict .tier.model.volume -}}
{{- printf "%s/%s" (default "/models" $volume.mountPath) .tier.model.path -}}
{{- end -}}
{{- end -}}

{{/* The autoscaling settings of a tier: the global ones, overridden by the tier's. */}}
{{- define "tokenmill.autoscaling" -}}
{{- toYaml (mergeOverwrite (deepCopy .root.Values.autoscaling) (deepCopy (default dict .tier.autoscaling))) -}}
{{- end -}}

{{/* Engine flags from the tier's engine values (vLLM's names). */}}
{{- define "tokenmill.engineArgs" -}}
{{- $e := default dict .tier.engine -}}
{{- $spec := .root.Values.servingEngineSpec -}}
{{- if $e.quantization }}
{{- fail (printf "modelSpec %s: engine.quantization=%v: tokenmill reads the quantization (AWQ, GPTQ, FP8, GGUF) from the checkpoint itself; remove engine.quantization and point model.path at the quantized checkpoint" .tier.name $e.quantization) }}
{{- end }}
{{- $gpuCount := int (default 0 (default dict .tier.gpu).count) }}
{{- $tp := int (default 1 $e.tensorParallelSize) }}
{{- if and (gt $tp 1) (ne $tp $gpuCount) }}
{{- fail (printf "modelSpec %s: engine.tensorParallelSize=%d needs gpu.count=%d GPUs in the pod, got %d (tokenmill plan ... --emit helm-values sizes both)" .tier.name $tp $tp $gpuCount) }}
{{- end }}
{{- with (include "tokenmill.modelArg" .) }}
- {{ . | quote }}
{{- end }}
- "--host"
- "0.0.0.0"
- "--port"
- "8000"
- "--served-model-name"
- {{ .tier.servedModelName | quote }}
{{- range $flag, $key := dict "--max-model-len" "maxModelLen" "--max-num-seqs" "maxNumSeqs" "--max-num-batched-tokens" "maxNumBatchedTokens" "--gpu-memory-utilization" "gpuMemoryUtilization" "--tensor-parallel-size" "tensorParallelSize" "--dtype" "dtype" "--kv-cache-memory" "kvCacheMemory" "--block-size" "blockSize" }}
{{- if hasKey $e $key }}
- {{ $flag | quote }}
- {{ index $e $key | toString | quote }}
{{- end }}
{{- end }}
{{- if and (hasKey $e "enablePrefixCaching") (not $e.enablePrefixCaching) }}
- "--no-enable-prefix-caching"
{{- end }}
{{- if $e.enforceEager }}
- "--enforce-eager"
{{- end }}
- "--shutdown-timeout"
- {{ $spec.shutdownTimeoutSeconds | toString | quote }}
{{- if .tier.gpuHourlyCost }}
- "--gpu-hourly-cost"
- {{ .tier.gpuHourlyCost | toString | quote }}
{{- end }}
{{- if $spec.otlpTracesEndpoint }}
- "--otlp-traces-endpoint"
- {{ $spec.otlpTracesEndpoint | quote }}
{{- end }}
{{- if and .root.Values.auth.enabled .root.Values.auth.apiKeysFileKey }}
- "--api-keys-file"
- "/etc/tokenmill/auth/api-keys.json"
{{- end }}
{{- range $e.extraArgs }}
- {{ . | toString | quote }}
{{- end }}
{{- end -}}
