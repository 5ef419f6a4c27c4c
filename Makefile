# carapace.fleet: everything a fresh machine (Python 3.11, apt, pip) needs is installed from here.
#   make test      set up, then lint, sanity, every pytest suite and the Molecule drills (CI runs this through .ci/run)
#   make unit | integration | lint | sanity | doc      one part
#   make browser                                      Chromium from apt (integration renders report.html in it)
#   make docs                                         the HTML docs site, offline, in build/docs/build/html
#   make refresh-trust-root                           re-pin Sigstore's production trusted_root.json
#   make demo                                         the main job on an embedded local fleet
#   make bench [BENCH_RECORD=1]                       benchmarks B1-B6 as ratios (benchmarks/RESULTS.md)
#   make molecule [S=upgrade]                         Molecule drills on podman container hosts (molecule/README.md)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
COLLECTIONS := $(CURDIR)/.collections
COLLECTION_LINK := $(COLLECTIONS)/ansible_collections/carapace/fleet
SANITY_ROOT := $(CURDIR)/build/sanity/ansible_collections/carapace/fleet
VERSION := $(shell sed -n 's/^version: *//p' galaxy.yml)
ARTIFACT := build/dist/carapace-fleet-$(VERSION).tar.gz
DOCS := build/docs
# ansible-test fetches a pip bootstrap script from a host we cannot reach; we supply our own (see the script).
ANSIBLE_TEST_PIP := $(HOME)/.ansible/test/cache/get_pip_24_2.py

export ANSIBLE_COLLECTIONS_PATH := $(COLLECTIONS)
export PATH := $(CURDIR)/$(BIN):$(PATH)

# Molecule drills on container hosts (make molecule-setup, make molecule S=<name>); see molecule/README.md.
include molecule/molecule.mk
# Benchmarks (make bench, not part of make test); see benchmarks/README.md.
include benchmarks/bench.mk

.PHONY: test demo setup venv collection lint sanity unit integration browser doc docs build refresh-trust-root clean

test: setup lint sanity doc docs unit integration molecule
	@echo "make test: all suites passed"

setup: venv collection

# The main job on an embedded local fleet: releases, a loopback server, 5 hosts, a rolling upgrade and a drill.
demo: setup
	scripts/demo.sh

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade 'pip>=24'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	touch $@

# The working tree itself, importable as ansible_collections.carapace.fleet (edits apply at once).
collection: $(COLLECTION_LINK)

$(COLLECTION_LINK):
	mkdir -p $(dir $@)
	ln -sfn ../../.. $@

# ansible-lint, then the changelog: fragments, changelogs/changelog.yaml, and CHANGELOG.md as generated from them.
lint: setup
	$(BIN)/ansible-lint --offline --profile production
	$(BIN)/antsibull-changelog lint
	$(BIN)/antsibull-changelog lint-changelog-yaml --strict changelogs/changelog.yaml
	mkdir -p build && $(BIN)/antsibull-changelog generate --output build/CHANGELOG.md --output-format md
	diff -u CHANGELOG.md build/CHANGELOG.md || { echo "CHANGELOG.md is stale: run antsibull-changelog generate" >&2; exit 1; }

# ansible-test wants the collection under ansible_collections/<ns>/<name> and lists files through git:
# sanity runs on the built artifact (what Galaxy would ship), in a throwaway git repository.
build: setup
	rm -rf build/dist && mkdir -p build/dist
	$(BIN)/ansible-galaxy collection build --force --output-path build/dist >/dev/null

sanity: build
	rm -rf build/sanity
	$(BIN)/ansible-galaxy collection install --force -p build/sanity $(ARTIFACT) >/dev/null
	cd $(SANITY_ROOT) && git init -q . && git add -A && \
		git -c user.name=sanity -c user.email=sanity@localhost commit -q -m sanity
	test -f $(ANSIBLE_TEST_PIP) || { mkdir -p $(dir $(ANSIBLE_TEST_PIP)) && cp scripts/ansible_test_get_pip.py $(ANSIBLE_TEST_PIP); }
	cd $(SANITY_ROOT) && $(CURDIR)/$(BIN)/ansible-test sanity --python 3.11 --color no 2>&1 \
		| { grep -vE '^(WARNING: Location|Looking in|Collecting|Downloading|Processing|Installing|Successfully|Requirement already|Attempting|Found existing|Uninstalling|  )' || true; }

doc: setup
	for m in plugins/modules/*.py; do n=$$(basename $$m .py); $(BIN)/ansible-doc carapace.fleet.$$n >/dev/null || exit 1; done
	for f in plugins/filter/*.yml; do $(BIN)/ansible-doc -t filter carapace.fleet.$$(basename $$f .yml) >/dev/null || exit 1; done
	for r in roles/*/; do $(BIN)/ansible-doc -t role carapace.fleet.$$(basename $$r) >/dev/null || exit 1; done
	@echo "ansible-doc: every module, filter and role renders"
	$(BIN)/antsibull-docs lint-collection-docs --plugin-docs .
	@echo "antsibull-docs: every module, filter, role entry point and runbook page lints"

# The docs site with antsibull-docs and Sphinx, offline, warnings as errors (build.sh runs sphinx-build -W), then a
# check that every module, filter, role and runbook has its page. sphinx-init wants a directory only its owner writes.
docs: setup
	rm -rf $(DOCS) && mkdir -p $(DOCS) && chmod 700 $(DOCS)
	$(BIN)/antsibull-docs sphinx-init --use-current --squash-hierarchy --fail-on-error --dest-dir $(DOCS) \
		--project carapace.fleet --title carapace.fleet --copyright 'carapace.fleet maintainers' carapace.fleet >/dev/null
	$(BIN)/python scripts/docsite.py offline $(DOCS)
	$(DOCS)/build.sh >$(DOCS)/build.log 2>&1 || { tail -n 40 $(DOCS)/build.log; exit 1; }
	$(BIN)/python scripts/docsite.py check $(DOCS)

unit: setup
	$(BIN)/python -m pytest -q tests/unit

# Runbook tests mostly wait on real processes: three pytest-xdist workers keep 2 cores busy (TEST_JOBS=0: serial).
TEST_JOBS ?= 3
integration: setup browser
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist worksteal --durations=15 tests/integration

# tests/integration/test_report_html.py renders report.html in a real browser: Debian's Chromium, headless.
browser:
	@command -v chromium >/dev/null || { \
		[ "$$(id -u)" = 0 ] || { echo "make browser: installing chromium needs root (apt-get)" >&2; exit 1; }; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
		command -v chromium >/dev/null; }

refresh-trust-root: setup
	$(BIN)/python scripts/refresh_trust_root.py

clean:
	rm -rf build .pytest_cache $(COLLECTIONS)
