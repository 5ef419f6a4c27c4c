# Molecule scenarios on container hosts (issue #6). Included by the top-level Makefile, which defines
# BIN (.venv/bin), the `setup` target (venv + collection link) and exports ANSIBLE_COLLECTIONS_PATH and PATH.
#
#   make molecule-setup                  Debian packages, containers.conf, driver collections, host image
#   make molecule                        the drills (upgrade rollback_drill fail_closed resume) and schedule, molecule test
#   make molecule S=smoke                one scenario (S=smoke: the container-host infrastructure itself)
#   make molecule MOLECULE_DRIVER=docker S=upgrade    the same scenario on a Docker engine (a laptop)
#   make molecule-run C=converge S=resume             another molecule command (hosts are kept)
#   make molecule-destroy [S=...]        remove a failed run's containers and networks
#
# The image is built once (scripts/molecule_setup.sh caches it) and shared by every scenario.

MOLECULE_DRIVER ?= podman
MOLECULE_DIR := $(CURDIR)/molecule
MOLECULE_STATE := $(CURDIR)/build/molecule
# The rollback drills and the schedule scenario `make molecule` (and so `make test`) runs; S=<name> picks others, e.g. S=smoke (the
# infrastructure's own check) or any directory of molecule/ holding a molecule.yml.
MOLECULE_SCENARIOS := resume rollback_drill fail_closed upgrade schedule
S ?= $(MOLECULE_SCENARIOS)
C ?= converge
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

.PHONY: molecule-setup molecule molecule-run molecule-destroy molecule-check-driver

molecule-setup: setup
	MOLECULE_DRIVER=$(MOLECULE_DRIVER) BIN=$(BIN) bash scripts/molecule_setup.sh

# molecule silently ignores a --base-config file that does not exist (and falls back to its `default` driver).
molecule-check-driver:
	@test -f $(MOLECULE_DIR)/$(MOLECULE_DRIVER).yml || \
		{ echo "molecule: no molecule/$(MOLECULE_DRIVER).yml (MOLECULE_DRIVER=podman or docker)" >&2; exit 2; }

# The release source (signed releases + fail_closed's broken ones) is built and served on 127.0.0.1 for the run.
molecule: molecule-check-driver molecule-setup
	$(MOLECULE_ENV) MOLECULE_DRIVER=$(MOLECULE_DRIVER) BIN=$(BIN) bash scripts/molecule_run.sh test $(S)

# Any other molecule command on the scenarios, with the release source up: make molecule-run C=converge S=resume
molecule-run: molecule-check-driver molecule-setup
	$(MOLECULE_ENV) MOLECULE_DRIVER=$(MOLECULE_DRIVER) BIN=$(BIN) bash scripts/molecule_run.sh $(C) $(S)

molecule-destroy: molecule-check-driver
	$(MOLECULE_ENV) MOLECULE_DRIVER=$(MOLECULE_DRIVER) BIN=$(BIN) bash scripts/molecule_run.sh destroy $(S)
