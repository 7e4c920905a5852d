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
"patch"; each pass lists an owner's children of each kind by lorafleet's owner label (to apply only what changed)
and deletes the ones it controls that are no longer desired, so "list" and "delete". Children of a deleted owner
go with the garbage collector.
*/}}
{{- define "lorafleet.rules" -}}
# The three kinds: listed and watched into the operator's caches; patched only for lorafleet's finalizer
# (FineTuneJobs with deletionPolicy: Delete).
- apiGroups: ["lorafleet.io"]
  resources: ["basemodels", "finetunejobs", "adapterdeployments"]
  verbs: ["get", "list", "watch", "patch"]
# A team's ArtifactStores, read when an object names one (storeRef, resolved in the object's own namespace).
- apiGroups: ["lorafleet.io"]
  resources: ["artifactstores"]
  verbs: ["get"]
# Status is written through the status subresource (merge patch).
- apiGroups: ["lorafleet.io"]
  resources: ["basemodels/status", "finetunejobs/status", "adapterdeployments/status"]
  verbs: ["patch"]
# Children carry ownerReferences with blockOwnerDeletion: clusters with the OwnerReferencesPermissionEnforcement
# admission plugin (OpenShift) require "update" on the owner's finalizers subresource for that.
- apiGroups: ["lorafleet.io"]
  resources: ["finetunejobs/finalizers", "adapterdeployments/finalizers"]
  verbs: ["update"]
# Children. Every kind is listed and watched (with lorafleet's managed-by label selector) into the operator's
# caches, so a child that changes or is deleted reconciles its owner at once; "get" reads by name a child's name
# that the caches do not hold, to refuse taking over an object someone else created (no takeover, issue 15).
# FineTuneJob children.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# AdapterDeployment children.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Trainer config, trainer progress and desired-adapter ConfigMaps, rendezvous and serving Services. (Holding
# configmaps patch is also what lets the operator grant the trainer's Role below: RBAC lets nobody grant what
# they do not hold.)
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The trainer's ServiceAccount, and a Role/RoleBinding that lets it patch its own progress ConfigMap (resourceNames:
# that one name) and nothing else: no pods, no other ConfigMap, no Secret.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Pods, read only: the trainer's termination message (its final report), the serving replicas to ask for their
# adapter states. No patch: a changed desired-adapter set reaches the replicas through the kubelet's own refresh
# of their ConfigMap volume (resources/adapterdeployment.py, build_adapters_config_map).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Events on condition transitions and handler errors (kopf posts core/v1 Events).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
"true" when the operator may write the Secrets it mints: rbac.mintSecrets when set (true or false), else
artifactStore.sts.enabled.
*/}}
{{- define "lorafleet.mintSecrets" -}}
{{- $mint := (.Values.rbac).mintSecrets }}
{{- if kindIs "bool" $mint }}{{ $mint }}{{ else }}{{ ((.Values.artifactStore).sts).enabled | default false }}{{ end }}
{{- end }}

{{/*
Secrets, in the namespaces rbac.secretNamespaces lists (rbac.yaml), not with lorafleet.rules. Call with the root.
*/}}
{{- define "lorafleet.secretRules" -}}
# Secrets, by name only (never list or watch: the operator holds no copy of any namespace's Secrets). Read where
# a store needs them, in the namespace of the object that names them:
# * controllers/artifacts.py `_secret_value`: the credentials (and CA bundle) of the store a BaseModel's
#   spec.source.store or a FineTuneJob's spec.output.store names, at an endpoint the platform allows, to read a
#   manifest (a BaseModel's digest, a finished FineTuneJob's adapter) and, with deletionPolicy Delete, to delete
#   the adapter version that FineTuneJob wrote.
# * controllers/basemodel.py `reconcile`: whether the Secrets a BaseModel names exist (a condition says which is
#   missing, instead of pods stuck in CreateContainerConfigError).
# Pods get their credentials through secretKeyRef and Secret volumes, which the kubelet resolves: creating them
# needs no Secret access. Tenants' Secrets can have any name, so RBAC narrows this by namespace only: where the
# operator may not read, the object gets StoreNotAllowed naming the Helm value rbac.secretNamespaces.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- if eq (include "lorafleet.mintSecrets" .) "true" }}
# rbac.mintSecrets (default: artifactStore.sts.enabled; also needed by a ClusterArtifactStore with spec.sts):
# minted store credentials (controllers/credentials.py), a Secret the workload owns, written by name (apply:
# create and patch): a FineTuneJob's <name>-store, deleted once the job has finished, and an AdapterDeployment's
# read-only <name>-serving-store, renewed in place and collected with it. create cannot be narrowed by name, and
# the names are per object; an existing Secret the object does not control is never written.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create", "patch", "delete"]
{{- end }}
{{- end }}
