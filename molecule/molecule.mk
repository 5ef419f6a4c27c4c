# Molecule scenarios on container hosts (issue #6). Included by the top-level Makefile, which defines
# BIN (.venv/bin), the `setup` target (venv + collection link) and exports ANSIBLE_COLLECTIONS_PATH and PATH.
#
#   make molecule-setup                  Debian packages, containers.conf, driver collections, host image
#   make molecule                        every scenario under molecule/ (molecule test), one after another
#   make molecule S=smoke                one scenario
#   make molecule MOLECULE_DRIVER=docker S=smoke      the same scenario on a Docker engine (a laptop)
#   make molecule-destroy [S=...]        remove a failed run's containers and networks
#
# The image is built once (scripts/molecule_setup.sh caches it) and shared by every scenario.

MOLECULE_DRIVER ?= podman
MOLECULE_DIR := $(CURDIR)/molecule
MOLECULE_STATE := $(CURDIR)/build/molecule
# Every directory of molecule/ holding a molecule.yml, in name order; S=<name> picks one.
MOLECULE_SCENARIOS := $(sort $(patsubst $(MOLECULE_DIR)/%/molecule.yml,%,$(wildcard $(MOLECULE_DIR)/*/molecule.yml)))
S ?= $(MOLECULE_SCENARIOS)
MOLECULE_BASE_CONFIGS := --base-config $(MOLECULE_DIR)/base.yml \
	--base-config $(MOLECULE_DIR)/$(MOLECULE_DRIVER).yml

# Environment of every molecule run (recipe-local: the rest of `make test` is not affected).
#  CONTAINERS_CONF    this VM's podman quirks (runc, cgroupfs, ulimits), written by the setup script
#  collections        the collection itself (.collections) + containers.podman, community.docker, ansible.posix
#  ANSIBLE_HOME       Ansible's and Molecule's scratch state (inventories, ansible.cfg) under build/molecule
#  MOLECULE_GLOB      scenarios live in molecule/ (not extensions/molecule/): no migration warning
MOLECULE_ENV := \
	CONTAINERS_CONF=$(MOLECULE_STATE)/containers.conf \
	ANSIBLE_COLLECTIONS_PATH=$(CURDIR)/.collections:$(MOLECULE_STATE)/collections \
	ANSIBLE_HOME=$(MOLECULE_STATE)/ansible-home \
	MOLECULE_GLOB='molecule/*/molecule.yml' \
	NO_COLOR=1 PY_COLORS=0 ANSIBLE_FORCE_COLOR=0 ANSIBLE_NOCOLOR=1

.PHONY: molecule-setup molecule molecule-destroy molecule-check-driver

molecule-setup: setup
	MOLECULE_DRIVER=$(MOLECULE_DRIVER) BIN=$(BIN) bash scripts/molecule_setup.sh

# molecule silently ignores a --base-config file that does not exist (and falls back to its `default` driver).
molecule-check-driver:
	@test -f $(MOLECULE_DIR)/$(MOLECULE_DRIVER).yml || \
		{ echo "molecule: no molecule/$(MOLECULE_DRIVER).yml (MOLECULE_DRIVER=podman or docker)" >&2; exit 2; }

molecule: molecule-check-driver molecule-setup
	@set -e; start=$$SECONDS; for s in $(S); do \
		echo "== molecule test -s $$s ($(MOLECULE_DRIVER))"; t=$$SECONDS; \
		$(MOLECULE_ENV) $(CURDIR)/$(BIN)/molecule $(MOLECULE_BASE_CONFIGS) test -s $$s; \
		echo "== molecule test -s $$s passed in $$((SECONDS - t)) s"; \
	done; echo "== molecule: $(words $(S)) scenario(s) passed in $$((SECONDS - start)) s"

molecule-destroy: molecule-check-driver
	@for s in $(S); do \
		$(MOLECULE_ENV) $(CURDIR)/$(BIN)/molecule $(MOLECULE_BASE_CONFIGS) destroy -s $$s || true; \
	done
