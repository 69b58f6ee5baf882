# The two commands of the README:
#   make run     the tiny pipeline on CPU into ./artifacts (sets everything up first), then its report
#   make test    every test suite, each in its own environment (sets everything up first)
PYTHON ?= python3
CLI    := .venvs/cli
HALA   := $(CLI)/bin/hala
RECIPE ?= recipes/tiny.yaml
STORE  ?= artifacts
ARGS   ?=
RUN    ?= tiny

.PHONY: setup run test browser dry-run schemas images compose-run render clean clean-artifacts

# The CLI environment is made with plain pip (it is what runs `hala setup` for the others); its stamp
# is the inputs it was made from, so a second `make setup` only asks `hala setup`, which has its own stamps.
$(CLI)/.make-stamp: pyproject.toml shared/requirements.txt tests/requirements.txt shared/constraints.txt
	$(PYTHON) -m venv $(CLI)
	$(CLI)/bin/python -m pip install --disable-pip-version-check -qq -c shared/constraints.txt \
		-r shared/requirements.txt -r tests/requirements.txt
	$(CLI)/bin/python -m pip install --disable-pip-version-check -qq --no-deps -e .
	touch $@

setup: $(CLI)/.make-stamp
	$(HALA) setup

run: setup
	$(HALA) run $(RECIPE) --store $(STORE) $(ARGS)
	$(HALA) report $(RUN) --store $(STORE)

dry-run: $(CLI)/.make-stamp
	$(HALA) run recipes/hala-paper.yaml --dry-run

test: setup browser
	$(HALA) test $(ARGS)

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

# The generated files that are checked in: compose files and the images' requirement lists.
render: $(CLI)/.make-stamp
	$(HALA) render images
	$(HALA) render compose recipes/tiny.yaml -o compose.yaml
	$(HALA) render compose recipes/hala-paper.yaml --variant cuda -o compose.gpu.yaml

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
