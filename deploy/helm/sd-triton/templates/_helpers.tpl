{{- define "sd-triton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sd-triton.fullname" -}}
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

{{/* Labels that select the serving pods: Service, PodMonitor, PDB, Deployment. */}}
{{- define "sd-triton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sd-triton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "sd-triton.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "sd-triton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "sd-triton.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sd-triton.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sd-triton.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}

{{/* The repository argument Triton is given. */}}
{{- define "sd-triton.repositoryPath" -}}
{{- if eq .Values.modelRepository.source "pvc" }}
{{- if .Values.modelRepository.pvc.subPath }}
{{- printf "/models/%s" .Values.modelRepository.pvc.subPath }}
{{- else }}
{{- print "/models" }}
{{- end }}
{{- else }}
{{- .Values.modelRepository.uri }}
{{- end }}
{{- end }}

{{/*
The autoscaling signal, one PromQL expression for KEDA and the docs: requests
waiting for a stable_diffusion instance, summed over this release's pods.
prometheus-adapter's rule (deploy/prometheus-adapter/values.yaml) serves the
same series per pod to an autoscaling/v2 HPA.
*/}}
{{- define "sd-triton.pendingQuery" -}}
{{- printf "sum(nv_inference_pending_request_count{model=\"stable_diffusion\",namespace=\"%s\",pod=~\"%s-.*\"})" .Release.Namespace (include "sd-triton.fullname" .) }}
{{- end }}

{{- define "sd-triton.graceSeconds" -}}
{{- add .Values.rollout.preStopSeconds .Values.rollout.exitTimeoutSeconds .Values.rollout.graceMarginSeconds }}
{{- end }}

{{/* The triton container's environment: the admin key file and object-store credentials. */}}
{{- define "sd-triton.env" -}}
{{- $repo := .Values.modelRepository }}
{{- if .Values.adminKey.secretName }}
- name: SD_TRITON_ADMIN_KEY_FILE
  value: /var/run/secrets/sd-triton/admin/{{ .Values.adminKey.secretKey }}
{{- end }}
{{- if and (eq $repo.source "s3") $repo.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $repo.credentialsSecret }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $repo.credentialsSecret }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}
{{- if and (eq $repo.source "s3") $repo.s3Region }}
- name: AWS_DEFAULT_REGION
  value: {{ $repo.s3Region | quote }}
{{- end }}
{{- if and (eq $repo.source "gcs") $repo.credentialsSecret }}
- name: GOOGLE_APPLICATION_CREDENTIALS
  value: /var/run/secrets/sd-triton/gcs/credentials.json
{{- end }}
{{- with .Values.extraEnv }}
{{- toYaml . | nindent 0 }}
{{- end }}
{{- end }}

{{/*
A probe: no dead Python-backend stub in the container (the test of
server/watchdog.py's PROBE_COMMAND, verbatim) and Triton's health endpoint
answers 200. The image has python3 (the Python backend needs it), not curl.
*/}}
{{- define "sd-triton.healthCheck" -}}
{{- printf "! grep -qs '^[0-9]* (triton_python_b) Z ' /proc/[0-9]*/stat && exec python3 -c \"import urllib.request as r; r.urlopen('http://127.0.0.1:8000%s', timeout=4)\"" . }}
{{- end }}
