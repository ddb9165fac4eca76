# The few targets people type. Each one sets itself up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip's find-links index on this machine is noisy about missing mirror folders.
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: install stubs run test eval align-eval lint format build bench-tokenizer loadtest bench chaos clean k8s-check

PROTO := protos/onerec/v1/recommender.proto
STUBS := onerec/v1/recommender_pb2_grpc.py

install: $(STAMP) $(STUBS)

# The gRPC stubs are generated, never edited: protoc writes onerec/v1/ (git-ignored).
stubs: $(STUBS)
$(STUBS): $(PROTO) $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO)

# torch first and pinned, so nothing pulls a CUDA build; then the project with its extras.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 2>&1 | grep -v "is ignored: it is neither" || true
	$(PIP) -e '.[train,dev,loadtest]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import torch, onerec, faiss, grpc, tritonclient.grpc, onnxruntime"
	touch $(STAMP)

# Build the default model on the synthetic data (data, SIDs, ~5 min of training, a minute
# for the reward model, 20 ECPO steps against it, ONNX, model repository, feature store;
# each stage is reused when present), then serve it, ordered by the reward model: Triton
# and the gRPC front end on :50051, metrics on :9464.
run: install
	$(BIN)/onerec build
	$(BIN)/onerec serve

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

# The Helm chart in k8s/, offline: lint, render each profile with Helm's Go SDK, validate
# every object against Kubernetes 1.31 (strict). `make test` runs it too (tests/test_k8s.py).
k8s-check: install
	$(BIN)/python k8s/check.py

# Offline quality: build, train and evaluate on the synthetic set and, when present, on
# ../shared/data/ml-latest-small. Writes reports/eval.json and reports/eval.md. The eval
# config trains longer than `make run`'s 4.5 minutes (EVAL_MINUTES for the SID model, then
# EVAL_RANKER_MINUTES for the ranking stage alone, and SASRec gets at least the same wall
# time); about 70 minutes in all on 2 cores. EVAL_USERS samples users (default: every user).
# Each user's last EVAL_TEST_EVENTS events are held out of the SIDs and of training: the
# report's headline scores the last one, its last-5 row each of them against the history
# up to it, and its stage analysis says where OneRec loses what it misses. Every data set
# gets the same flags: the codebook size follows the catalog's size, and the report lists it
# beside the ranking weight, the one choice fitted (on validation events) per data set.
ML_SMALL ?= ../shared/data/ml-latest-small
EVAL_TEST_EVENTS ?= 5
# The split follows validation: the SID model's best epoch was its last at 12 minutes, the
# ranking stage alone kept its 2nd of 50 epochs in 4 (docs/findings.md).
EVAL_MINUTES ?= 15
EVAL_RANKER_MINUTES ?= 1
EVAL_USERS ?=
EVAL_TRAIN = --minutes $(EVAL_MINUTES) --ranker-minutes $(EVAL_RANKER_MINUTES) --epochs 24 \
  --samples-per-user 16
EVAL_FLAGS = $(if $(EVAL_USERS),--max-users $(EVAL_USERS))
# --force: the tokenizer is rebuilt (seconds) as the model is retrained, never stale.
EVAL_BUILD = --test-events $(EVAL_TEST_EVENTS) --force
eval: install
	rm -f reports/eval.json
	$(BIN)/onerec build --until tokenizer --out artifacts/eval-synthetic $(EVAL_BUILD)
	$(BIN)/onerec train --artifacts artifacts/eval-synthetic $(EVAL_TRAIN)
	$(BIN)/onerec eval --artifacts artifacts/eval-synthetic --name synthetic $(EVAL_FLAGS)
	if [ -d $(ML_SMALL) ]; then \
	  $(BIN)/onerec build --until tokenizer --source $(ML_SMALL) --out artifacts/ml-latest-small \
	    $(EVAL_BUILD) && \
	  $(BIN)/onerec train --artifacts artifacts/ml-latest-small $(EVAL_TRAIN) && \
	  $(BIN)/onerec eval --artifacts artifacts/ml-latest-small $(EVAL_FLAGS); \
	fi

# Preference alignment (issue 22): a synthetic model (4 minutes of training) and its reward
# model, each reused when present; RL post-training with ECPO, GRPO and DPO (a few minutes
# each), and ECPO again with sampled groups and without the next-token mix as ablations; then
# every row graded by the user simulator. ml-latest-small, when present, gets the same
# without a simulator: NDCG@10 and the like-rate among hits before and after alignment.
# Writes reports/align.json and reports/align.md. ALIGN_USERS samples users (default: all).
ALIGN_USERS ?=
ALIGN_FLAGS = $(if $(ALIGN_USERS),--max-users $(ALIGN_USERS))
ALIGN_SYN := artifacts/align-synthetic
ALIGN_ML := artifacts/align-ml-latest-small
ALIGN = $(BIN)/onerec align --artifacts
align-eval: install
	$(BIN)/onerec build --until tokenizer --out $(ALIGN_SYN)
	test -f $(ALIGN_SYN)/model/checkpoint.pt || $(BIN)/onerec train --artifacts $(ALIGN_SYN) --minutes 4
	test -f $(ALIGN_SYN)/model/reward.pt || $(BIN)/onerec reward --artifacts $(ALIGN_SYN) --name synthetic
	for m in ecpo grpo dpo; do $(ALIGN) $(ALIGN_SYN) --method $$m || exit 1; done
	$(ALIGN) $(ALIGN_SYN) --method ecpo --search sample --name ecpo-sample
	$(ALIGN) $(ALIGN_SYN) --method ecpo --ntp-weight 0 --name ecpo-ntp0
	$(BIN)/onerec align-eval --artifacts $(ALIGN_SYN) --name synthetic $(ALIGN_FLAGS) \
	  --extra ecpo-sample ecpo-ntp0
	if [ -d $(ML_SMALL) ]; then \
	  $(BIN)/onerec build --until tokenizer --source $(ML_SMALL) --out $(ALIGN_ML) && \
	  { test -f $(ALIGN_ML)/model/checkpoint.pt || $(BIN)/onerec train --artifacts $(ALIGN_ML) --minutes 4; } && \
	  { test -f $(ALIGN_ML)/model/reward.pt || \
	    $(BIN)/onerec reward --artifacts $(ALIGN_ML) --name ml-latest-small; } && \
	  for m in ecpo grpo dpo; do $(ALIGN) $(ALIGN_ML) --method $$m || exit 1; done && \
	  $(BIN)/onerec align-eval --artifacts $(ALIGN_ML) --name ml-latest-small $(ALIGN_FLAGS); \
	fi

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench-tokenizer: install
	$(BIN)/onerec bench tokenizer --items 100000 --codebook-size 256

# Bounded headless Locust run; starts the stack first if nothing serves at HOST.
USERS ?= 20
SPAWN_RATE ?= 10
DURATION ?= 30s
HOST ?= localhost:50051
loadtest: install
	$(BIN)/onerec build
	$(BIN)/python loadtest/run.py --host $(HOST) --users $(USERS) --spawn-rate $(SPAWN_RATE) \
	  --run-time $(DURATION) --out reports/loadtest

# The serving stack against the naive baseline (same run, same weights): writes
# reports/bench.json, reports/bench.md and PNG plots. About 5 minutes after the build.
bench: install
	$(BIN)/onerec build
	$(BIN)/python -m loadtest.bench --out reports

# Faults under load (docs/operations.md): Redis, a supervised Triton and two front ends on
# this machine; kill -9 of a front end, of tritonserver and of Redis, and a SIGTERM drain,
# each under load, then a soak at half the peak for SOAK_S seconds. Writes
# reports/chaos.json, reports/chaos.md and reports/chaos_p99.png; exits 3 if an
# acknowledged event was lost, a fault did not recover, the soak saw an error or a
# process's RSS grew 5% or more. About 14 minutes after the build.
SOAK_S ?= 600
chaos: install
	$(BIN)/onerec build
	$(BIN)/python -m loadtest.chaos --out reports --soak-s $(SOAK_S)

clean:
	rm -rf artifacts reports .pytest_cache .ruff_cache .hypothesis
