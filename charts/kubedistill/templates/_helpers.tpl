{{/* Chart name, truncated to the 63 characters of a label value. */}}
{{- define "kubedistill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release, plus the chart name unless the release already contains it. */}}
{{- define "kubedistill.fullname" -}}
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

{{- define "kubedistill.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubedistill.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of everything but the CRDs (which carry their own app.kubernetes.io/part-of). */}}
{{- define "kubedistill.labels" -}}
{{ include "kubedistill.crdLabels" . }}
app.kubernetes.io/part-of: kubedistill
{{- end }}

{{- define "kubedistill.crdLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kubedistill.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kubedistill.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubedistill.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, the tag defaulting to appVersion; "TAG@sha256:..." keeps its digest. */}}
{{- define "kubedistill.image" -}}
{{- $image := index . 0 }}{{- $root := index . 1 }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}

{{/* Peering is on with more than one replica: kopf then lets exactly one of them handle objects. */}}
{{- define "kubedistill.peering" -}}
{{- if gt (int .Values.replicaCount) 1 }}{{ .Values.peering.name }}{{ end }}
{{- end }}

{{- define "kubedistill.minioName" -}}
{{- printf "%s-minio" (include "kubedistill.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The storage settings in force: explicit values first, then the in-cluster MinIO's. */}}
{{- define "kubedistill.storageBucket" -}}
{{- if .Values.storage.bucket }}{{ .Values.storage.bucket }}{{ else if .Values.minio.enabled }}{{ .Values.minio.bucket }}{{ end }}
{{- end }}

{{- define "kubedistill.storageEndpoint" -}}
{{- if .Values.storage.endpoint }}{{ .Values.storage.endpoint }}
{{- else if .Values.minio.enabled }}{{ printf "http://%s.%s.svc:9000" (include "kubedistill.minioName" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{- define "kubedistill.storageSecret" -}}
{{- if .Values.storage.existingSecret }}{{ .Values.storage.existingSecret }}
{{- else if .Values.minio.enabled }}{{ include "kubedistill.minioName" . }}
{{- end }}
{{- end }}

{{/* The Secret holding the gateway's master key: the user's, or the one the chart creates. */}}
{{- define "kubedistill.gatewayMasterKeySecret" -}}
{{- default (printf "%s-gateway-master-key" (include "kubedistill.fullname" .)) .Values.gateway.masterKey.existingSecret }}
{{- end }}

{{/* What the operator does in a namespace whose ModelAliases it serves: model servers (Deployment +
Service per served GGUF) and their pods' states, which say why a server never became Ready. */}}
{{- define "kubedistill.servingRules" -}}
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "patch", "delete"]
{{- end }}

{{/* Namespaces where the operator may read Secrets (see rbac.secretNamespaces). */}}
{{- define "kubedistill.secretNamespaces" -}}
{{- if .Values.rbac.secretNamespaces }}{{ join "," .Values.rbac.secretNamespaces }}
{{- else }}{{ join "," .Values.watchNamespaces }}
{{- end }}
{{- end }}

{{/* What the operator does in a namespace it runs jobs in: exactly the calls of kubedistill.k8s. */}}
{{- define "kubedistill.jobRules" -}}
- apiGroups: ["kubedistill.io"]
  resources: ["distillationjobs", "modelaliases"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kubedistill.io"]
  # Promotion creates the ModelAlias a job names when it does not exist yet.
  resources: ["modelaliases"]
  verbs: ["create"]
- apiGroups: ["kubedistill.io"]
  resources: ["distillationjobs/status", "modelaliases/status"]
  verbs: ["patch"]
- apiGroups: ["kubedistill.io"]
  # Owner references with blockOwnerDeletion need this where OwnerReferencesPermissionEnforcement is on.
  resources: ["distillationjobs/finalizers", "modelaliases/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "get", "list", "watch", "delete", "patch"]
- apiGroups: [""]
  # Stage Pods are listed for why a stage waits (unschedulable, image pull); logs are never read.
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: [""]
  # Dataset ConfigMaps are read for the estimate; a large stage invocation travels in a ConfigMap.
  resources: ["configmaps"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.gateway.enabled }}
{{ include "kubedistill.servingRules" . }}
{{- end }}
{{- end }}

{{/* The operator's settings and storage access; the uninstall hook (kubedistill doctor) gets the same. */}}
{{- define "kubedistill.operatorEnv" -}}
envFrom:
  - configMapRef:
      name: {{ include "kubedistill.fullname" . }}-settings
env:
  - name: POD_NAMESPACE
    valueFrom:
      fieldRef:
        fieldPath: metadata.namespace
  {{- with (include "kubedistill.storageEndpoint" .) }}
  # The operator reads progress and results from the artifact store itself.
  - name: KUBEDISTILL_S3_ENDPOINT
    value: {{ . | quote }}
  {{- end }}
  {{- with (include "kubedistill.storageSecret" .) }}
  - name: AWS_ACCESS_KEY_ID
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: AWS_ACCESS_KEY_ID
  - name: AWS_SECRET_ACCESS_KEY
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: AWS_SECRET_ACCESS_KEY
  {{- end }}
  {{- with .Values.operator.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
