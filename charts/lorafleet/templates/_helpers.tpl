{{/* Chart name. */}}
{{- define "lorafleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, plus the chart name unless it already contains it. */}}
{{- define "lorafleet.fullname" -}}
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

{{/* Selector labels: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "lorafleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lorafleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels of every object. */}}
{{- define "lorafleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "lorafleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: lorafleet
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "lorafleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lorafleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: registry prefix, tag defaulting to the appVersion, digest winning.
Call with (dict "image" .Values.images.trainer "root" .).
*/}}
{{- define "lorafleet.image" -}}
{{- $registry := .root.Values.images.registry | trimSuffix "/" }}
{{- $repo := .image.repository }}
{{- if $registry }}{{ $repo = printf "%s/%s" $registry $repo }}{{ end }}
{{- if .image.digest }}
{{- printf "%s@%s" $repo .image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{- define "lorafleet.syncImage" -}}
{{- if .Values.images.sync.repository }}
{{- include "lorafleet.image" (dict "image" .Values.images.sync "root" .) }}
{{- else }}
{{- include "lorafleet.image" (dict "image" .Values.images.operator "root" .) }}
{{- end }}
{{- end }}

{{/*
The operator's RBAC rules in the watched namespaces (or cluster-wide), derived from what the code reads and writes.
Children are written with server-side apply: a PATCH that creates the object when it is missing, so "create" and
"patch". The operator never deletes children (owner references and the garbage collector do).
*/}}
{{- define "lorafleet.rules" -}}
# The three kinds: kopf lists and watches them and patches its annotations and finalizers; handlers read them.
- apiGroups: ["lorafleet.io"]
  resources: ["basemodels", "finetunejobs", "adapterdeployments"]
  verbs: ["get", "list", "watch", "patch"]
# Status is written through the status subresource (merge patch).
- apiGroups: ["lorafleet.io"]
  resources: ["basemodels/status", "finetunejobs/status", "adapterdeployments/status"]
  verbs: ["patch"]
# Children carry ownerReferences with blockOwnerDeletion: clusters with the OwnerReferencesPermissionEnforcement
# admission plugin (OpenShift) require "update" on the owner's finalizers subresource for that.
- apiGroups: ["lorafleet.io"]
  resources: ["finetunejobs/finalizers", "adapterdeployments/finalizers"]
  verbs: ["update"]
# FineTuneJob children; kopf watches Jobs (labelled ones) to reconcile their owner at once.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# AdapterDeployment children; kopf watches Deployments.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Trainer config and desired-adapter ConfigMaps, rendezvous and serving Services.
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "create", "patch"]
# The trainer's ServiceAccount, and a Role/RoleBinding that lets it patch its own pod (progress annotation).
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["create", "patch"]
# Read the trainer's pods (progress, termination message). The Role above grants pods get/patch, and RBAC lets
# nobody grant what they do not hold (escalation prevention), so the operator holds get and patch too.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "patch"]
# Credentials and CA bundles that specs reference (read only, by name).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["create", "patch"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "patch"]
# Events on condition transitions and handler errors (kopf posts core/v1 Events).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
