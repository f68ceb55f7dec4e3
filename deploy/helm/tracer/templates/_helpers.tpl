{{/* Labels on every object. */}}
{{- define "tracer.labels" -}}
app.kubernetes.io/name: tracer-agent
app.kubernetes.io/part-of: tracer
{{- end }}

{{/* What the DaemonSet and the PodMonitor select the agent's pods by. */}}
{{- define "tracer.selectorLabels" -}}
app.kubernetes.io/name: tracer-agent
{{- end }}
