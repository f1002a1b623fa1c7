{{/* Object names: <release>-federator, or the release name when it already says federator. */}}
{{- define "federator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "federator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The operator pod's name label is fixed: each Federation's NetworkPolicy admits pods named
     federator-operator to the server's metrics port, where the operator reads /status. */}}
{{- define "federator.selectorLabels" -}}
app.kubernetes.io/name: federator-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "federator.labels" -}}
{{ include "federator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: federator
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "federator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "federator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "federator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Labels of the pods the operator creates (children.py): the monitors select federation pods by them. */}}
{{- define "federator.childLabel" -}}
app.kubernetes.io/managed-by: federator
{{- end -}}

{{/* Rules on namespaced resources: in a ClusterRole, or a Role per watched namespace.
     tests/integration/test_rbac.py derives these from what the real operator requests. */}}
{{- define "federator.namespacedRules" -}}
# Federations and FederatedClients: watch them, keep the finalizer and kopf's annotations, write status.
- apiGroups: [federator.dev]
  resources: [federations]
  verbs: [get, list, watch, patch]
- apiGroups: [federator.dev]
  resources: [federatedclients]
  verbs: [list, watch, patch]
- apiGroups: [federator.dev]
  resources: [federations/status, federatedclients/status]
  verbs: [patch]
# Children carry ownerReferences with blockOwnerDeletion, which needs update on the owner's finalizers
# where the OwnerReferencesPermissionEnforcement admission plugin runs.
- apiGroups: [federator.dev]
  resources: [federations/finalizers, federatedclients/finalizers]
  verbs: [update]
# The children: watched (drift repair), server-side applied (patch; create for the first apply), the
# Secret created once, optional children pruned and stateless ones re-created on an immutable-field
# change (delete). StatefulSets are never deleted: they hold the checkpoint.
- apiGroups: [""]
  resources: [configmaps, services, secrets]
  verbs: [get, list, watch, create, patch]
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [get, list, watch, create, patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch]
- apiGroups: [monitoring.coreos.com]
  resources: [servicemonitors]
  verbs: [get, list, watch, create, patch, delete]
# kopf posts events on the objects it handles.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}

{{/* Rules on cluster-scoped resources (kopf's discovery): always in a ClusterRole. */}}
{{- define "federator.clusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end -}}

{{/* The job label of the operator's own metrics (its PodMonitor sets it; FederatorOperatorDown reads it). */}}
{{- define "federator.operatorJob" -}}
{{ include "federator.fullname" . }}-operator
{{- end }}
