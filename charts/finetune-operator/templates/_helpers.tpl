{{/* Names, labels and the one RBAC rules template shared by the Role and ClusterRole flavours. */}}

{{/* The chart name, or nameOverride. */}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* release-chart, shortened to the 63 characters a label value allows; the release name alone when it
     already contains the chart name. */}}
{{- define "finetune-operator.fullname" -}}
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

{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetunejob
{{- end }}

{{/* Labels that select the operator pods; never change them after a release, Deployment selectors are immutable. */}}
{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels every trainer pod carries (set by the operator). */}}
{{- define "finetune-operator.trainerSelectorLabels" -}}
app.kubernetes.io/name: finetune-trainer
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository@digest when a digest is given (pulled by digest), else repository:tag (tag defaults to appVersion).
     Call with (dict "image" .Values.image "root" .). */}}
{{- define "finetune-operator.imageRef" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/* The namespaces the operator serves, as a JSON list; [] means every namespace. With rbac.scope=namespace an
     empty watchNamespaces means the release namespace, since Roles cannot cover every namespace. */}}
{{- define "finetune-operator.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- .Values.watchNamespaces | uniq | toJson }}
{{- else if eq .Values.rbac.scope "namespace" }}
{{- list .Release.Namespace | toJson }}
{{- else }}
{{- list | toJson }}
{{- end }}
{{- end }}

{{/* "true" when the operator watches every namespace (kopf's cluster-wide mode), else "". */}}
{{- define "finetune-operator.clusterwide" -}}
{{- if not (include "finetune-operator.watchNamespaces" . | fromJsonArray) }}true{{ end }}
{{- end }}

{{/* Namespaces that get the per-namespace objects (Roles, KopfPeerings, trainer NetworkPolicies): the watched
     ones, or the release namespace when watching all. */}}
{{- define "finetune-operator.trainerNamespaces" -}}
{{- $watched := include "finetune-operator.watchNamespaces" . | fromJsonArray }}
{{- if $watched }}{{ $watched | toJson }}{{ else }}{{ list .Release.Namespace | toJson }}{{ end }}
{{- end }}

{{/* "true" when replicas share work through kopf peering (more than one replica), else "" (standalone). */}}
{{- define "finetune-operator.peering" -}}
{{- if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{/* The kopf peering object's name: FINETUNE_PEERING. */}}
{{- define "finetune-operator.peeringName" -}}
{{- include "finetune-operator.fullname" . }}
{{- end }}

{{/*
The operator's RBAC rules, least privilege, in two sections so that the Role and ClusterRole flavours share them.
Call with (dict "root" . "section" "namespaced") for what every watched namespace needs, or "section" "cluster"
for what only a ClusterRole can grant. Exactly what the operator uses: its own requests (API_RBAC in
finetune_operator/api.py) and kopf's (KOPF_RBAC in finetune_operator/handlers.py); tests/unit/test_operator_rbac.py
keeps the three equal. Kopf's peering objects: cluster-wide mode uses ClusterKopfPeering, namespaced mode (a list of
namespaces) one KopfPeering per namespace; both only with replicas > 1. No handler needs a finalizer, so nothing
patches the jobs themselves, and kopf never lists namespaces (they are given by name, or all of them).
*/}}
{{- define "finetune-operator.rbacRules" -}}
{{- $root := .root }}
{{- $clusterwide := include "finetune-operator.clusterwide" $root }}
{{- $peering := include "finetune-operator.peering" $root }}
{{- if eq .section "namespaced" }}
# The jobs: kopf lists and watches them; the operator reads one it has no watch event for yet, and deletes
# finished ones after ttlSecondsAfterFinished.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "delete"]
# Children name their job as controller with blockOwnerDeletion (a foreground delete waits for the pods); the
# OwnerReferencesPermissionEnforcement admission plugin requires this to let the operator set that flag.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
# Status is written only by the operator, one merge patch of the status subresource per reconcile.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# One trainer pod per node of the gang: watched by kopf, listed per job, deleted when an attempt ends. Children
# are read only when a create finds the name taken, to never reuse another job's (a deleted job of the same name).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
# The headless rendezvous Service of each job (the garbage collector deletes it with the job).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create"]
# The trainer config ConfigMap of each job, its data replaced for every new attempt.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
# Events: the job's own (kubectl describe), and reading the scheduler's FailedScheduling / TriggeredScaleUp
# events of pending pods (WaitingForCapacity).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
{{- if or $root.Values.kueue.enabled ($root.Capabilities.APIVersions.Has "kueue.x-k8s.io/v1beta2") }}
# Kueue (where its CRDs exist, or kueue.enabled): a job with spec.queueName gets a Workload the operator creates, watches (admission,
# eviction), marks Finished or evicted-and-stopped in its status, and deletes when the job is suspended.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads/status"]
  verbs: ["patch"]
{{- end }}
{{- if $root.Values.gangScheduling.volcano }}
# Gang scheduling by Volcano (gangScheduling.volcano): a PodGroup per attempt of each gang job, created before its
# pods, listed on every reconcile, deleted when the attempt or the job ends; read when a create finds the name taken.
- apiGroups: ["scheduling.volcano.sh"]
  resources: ["podgroups"]
  verbs: ["get", "list", "create", "delete"]
{{- end }}
{{- if $root.Values.gangScheduling.coscheduling }}
# Gang scheduling by scheduler-plugins' coscheduling (gangScheduling.coscheduling): the same, in its API group.
- apiGroups: ["scheduling.x-k8s.io"]
  resources: ["podgroups"]
  verbs: ["get", "list", "create", "delete"]
{{- end }}
{{- if and $peering (not $clusterwide) }}
# Peering between replicas in namespaced mode: one KopfPeering per watched namespace (kopf watches it and patches
# its keep-alives; the operator reads it to pause its resync while another replica works).
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- else if eq .section "cluster" }}
# Kopf watches CRDs to notice the FineTuneJob resource appear or change.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if not $clusterwide }}
# Watching named namespaces, kopf lists and watches namespaces to start and stop its per-namespace watches.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- if or $root.Values.kueue.enabled ($root.Capabilities.APIVersions.Has "kueue.x-k8s.io/v1beta2") }}
# Kueue: the admitted ResourceFlavors' node labels and tolerations go on the pods; a WorkloadPriorityClass's value
# becomes the Workload's priority.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["resourceflavors", "workloadpriorityclasses"]
  verbs: ["get"]
{{- end }}
{{- if and $clusterwide $peering }}
# Peering between replicas in cluster-wide mode.
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- else }}
{{- fail (printf "finetune-operator.rbacRules: unknown section %q" .section) }}
{{- end }}
{{- end }}

{{/* NetworkPolicy egress rule to the cluster DNS; call with .Values.networkPolicy.dns. */}}
{{- define "finetune-operator.dnsEgressRule" -}}
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ .namespace }}
      podSelector:
        matchLabels:
          {{- toYaml .podLabels | nindent 10 }}
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end }}

{{/* Ports trainers open to each other: torchrun's rendezvous port and the range NCCL/gloo listen on. */}}
{{- define "finetune-operator.collectivePorts" -}}
- port: {{ .Values.trainer.rendezvousPort }}
  protocol: TCP
- port: {{ .Values.networkPolicy.collectivePorts.start }}
  endPort: {{ .Values.networkPolicy.collectivePorts.end }}
  protocol: TCP
{{- end }}
