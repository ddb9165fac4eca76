{{/* Names and labels shared by every object. */}}
{{- define "onerec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "onerec.fullname" -}}
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

{{- define "onerec.frontend.fullname" -}}
{{- printf "%s-frontend" (include "onerec.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "onerec.triton.fullname" -}}
{{- printf "%s-triton" (include "onerec.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "onerec.redis.fullname" -}}
{{- printf "%s-redis" (include "onerec.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "onerec.featureLoad.fullname" -}}
{{- printf "%s-feature-load" (include "onerec.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "onerec.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "onerec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: "frontend", "triton", "redis" or "feature-load". */}}
{{- define "onerec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "onerec.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "onerec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "onerec.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "onerec.image" -}}
{{- printf "%s:%s" .repository (default .root.Chart.AppVersion .tag) }}
{{- end }}

{{/*
The front end dials every Triton pod through the headless Service (gRPC round robin over
its DNS records): one long-lived HTTP/2 connection to the ClusterIP would pin each front
end to a single Triton pod, whatever Triton's replica count.
*/}}
{{- define "onerec.tritonGrpcUrl" -}}
{{- printf "dns:///%s-headless:%d" (include "onerec.triton.fullname" .) (int .Values.triton.ports.grpc) }}
{{- end }}

{{/*
The model volume and the init containers that fill it, shared by both Deployments so
Triton and the front end always serve the same build. Fails on a source it does not know.
*/}}
{{- define "onerec.modelVolume" -}}
{{- $m := .Values.modelRepository -}}
- name: models
{{- if eq $m.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "modelRepository.pvc.claimName is required when source=pvc" $m.pvc.claimName }}
    readOnly: true
{{- else if or (eq $m.source "image") (eq $m.source "url") }}
  emptyDir:
    sizeLimit: {{ $m.sizeLimit }}
{{- else }}
{{- fail (printf "modelRepository.source must be image, url or pvc, not %q" $m.source) }}
{{- end }}
{{- end }}

{{- define "onerec.modelMount" -}}
- name: models
  mountPath: {{ .Values.modelRepository.mountPath }}
  readOnly: true
{{- with .Values.modelRepository.pvc.subPath }}
{{- if eq $.Values.modelRepository.source "pvc" }}
  subPath: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Init container that fills the model volume (nothing for a PVC).
Arguments: dict "root" $ "securityContext" <the container security context>. */}}
{{- define "onerec.modelInit" -}}
{{- $root := .root -}}
{{- $m := $root.Values.modelRepository -}}
{{- if eq $m.source "image" }}
- name: fetch-model
  image: {{ include "onerec.image" (dict "root" $root "repository" $m.image.repository "tag" $m.image.tag) }}
  imagePullPolicy: {{ $m.image.pullPolicy }}
  command: ["cp", "-R", "/bundle/repository", "/bundle/artifacts", "{{ $m.mountPath }}/"]
  volumeMounts:
    - name: models
      mountPath: {{ $m.mountPath }}
  securityContext:
    {{- toYaml .securityContext | nindent 4 }}
  resources:
    requests: {cpu: 100m, memory: 64Mi}
    limits: {cpu: "1", memory: 256Mi}
{{- else if eq $m.source "url" }}
- name: fetch-model
  # The front-end image has Python: urllib + tarfile with the "data" filter, no extra image.
  image: {{ include "onerec.image" (dict "root" $root "repository" $root.Values.frontend.image.repository "tag" $root.Values.frontend.image.tag) }}
  imagePullPolicy: {{ $root.Values.frontend.image.pullPolicy }}
  command:
    - python
    - -c
    - |
      import hashlib, os, sys, tarfile, tempfile, urllib.request
      url, want, dest = os.environ["MODEL_URL"], os.environ.get("MODEL_SHA256", ""), sys.argv[1]
      with tempfile.TemporaryFile(dir=dest) as f:
          with urllib.request.urlopen(url, timeout=60) as r:
              h = hashlib.sha256()
              while chunk := r.read(1 << 20):
                  h.update(chunk)
                  f.write(chunk)
          if want and h.hexdigest() != want:
              sys.exit(f"{url}: sha256 {h.hexdigest()} != {want}")
          f.seek(0)
          with tarfile.open(fileobj=f, mode="r:*") as t:
              t.extractall(dest, filter="data")
      for part in ("repository", "artifacts"):
          if not os.path.isdir(os.path.join(dest, part)):
              sys.exit(f"{url}: the archive has no {part}/ at its top level")
    - {{ $m.mountPath }}
  env:
    - name: MODEL_URL
      value: {{ required "modelRepository.url.location is required when source=url" $m.url.location | quote }}
    - name: MODEL_SHA256
      value: {{ $m.url.sha256 | quote }}
  volumeMounts:
    - name: models
      mountPath: {{ $m.mountPath }}
  securityContext:
    {{- toYaml .securityContext | nindent 4 }}
  resources:
    requests: {cpu: 100m, memory: 128Mi}
    limits: {cpu: "1", memory: 512Mi}
{{- end }}
{{- end }}

{{/*
The feature store's URL (ONEREC_FEATURE_STORE), never with a password in it: the chart's
Redis Service, or externalRedis.url. Fails on a configuration that would point nowhere.
*/}}
{{- define "onerec.featureStoreUrl" -}}
{{- $url := .Values.externalRedis.url -}}
{{- if .Values.redis.enabled }}
{{- if $url }}
{{- fail "externalRedis.url is set but redis.enabled is true: set redis.enabled=false to use the external Redis" }}
{{- end }}
{{- if gt (int .Values.frontend.settings.redisWaitReplicas) 0 }}
{{- fail "frontend.settings.redisWaitReplicas > 0 needs Redis replicas; the chart's Redis (redis.enabled) has none: use an external Redis with replicas" }}
{{- end }}
{{- printf "redis://%s:%d/0" (include "onerec.redis.fullname" .) (int .Values.redis.port) }}
{{- else if not $url }}
{{- fail "redis.enabled is false: set externalRedis.url (redis://host:6379/0 or rediss://...) to the feature store the front ends share" }}
{{- else if regexMatch "^rediss?://[^/@]*:[^/@]*@" $url }}
{{- fail "externalRedis.url must not carry a password: put it in the Secret externalRedis.existingSecret names" }}
{{- else }}
{{- $url }}
{{- end }}
{{- end }}

{{/* The Secret and key holding the Redis password: "" when an external Redis has none. */}}
{{- define "onerec.redis.secretName" -}}
{{- if .Values.redis.enabled }}
{{- default (include "onerec.redis.fullname" .) .Values.redis.auth.existingSecret }}
{{- else }}
{{- .Values.externalRedis.existingSecret }}
{{- end }}
{{- end }}

{{- define "onerec.redis.secretKey" -}}
{{- if not .Values.redis.enabled }}
{{- .Values.externalRedis.passwordKey }}
{{- else if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.passwordKey }}
{{- else -}}
password
{{- end }}
{{- end }}

{{/* Env of a feature-store client (front end, featureLoad Job): the URL and the password,
from the Secret only, so it is in no ConfigMap, argument or URL. */}}
{{- define "onerec.featureStoreEnv" -}}
- name: ONEREC_FEATURE_STORE
  value: {{ include "onerec.featureStoreUrl" . | quote }}
{{- with include "onerec.redis.secretName" . }}
- name: ONEREC_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "onerec.redis.secretKey" $ }}
{{- end }}
{{- end }}
