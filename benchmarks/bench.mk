# Benchmarks (issue #7): what the collection exists for, measured as ratios to a baseline taken in the same run.
# Not part of `make test`. Included by the top-level Makefile, which defines BIN (.venv/bin) and `setup`.
#
#   make bench            B1..B5 (about 15 min on 2 CPUs), then the summary table (build/bench/summary.md)
#   make bench BENCH_RECORD=1      ... and write the table into benchmarks/RESULTS.md
#   make bench-quick      the same scripts on small fleets (a few minutes): a smoke run, not a record
#   make bench-profile    py-spy on a 5-host upgrade: where the CPU goes (controller vs host-side modules)
#   make bench-b3         one benchmark (b1 .. b5)
# Sizes and settings: see benchmarks/README.md (BENCH_B1_SIZES, BENCH_B5_HOSTS, BENCH_FORKS, ...).

BENCH_NICE ?= nice -n 10
BENCH_SCRIPTS := b1_verification b2_download b3_downtime b4_rollback_rto b5_scaling b6_controller_lost
BENCH_DEPS_STAMP := build/bench/.deps-installed

.PHONY: bench bench-quick bench-profile bench-deps bench-report $(addprefix bench-,b1 b2 b3 b4 b5 b6)

bench-deps: $(BENCH_DEPS_STAMP)

$(BENCH_DEPS_STAMP): benchmarks/requirements.txt | setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r benchmarks/requirements.txt
	mkdir -p $(dir $@) && touch $@

# Every script runs even when one fails; the exit status says whether any did (a missed goal is not a failure).
bench: setup bench-deps
	rm -rf build/bench/results
	@status=0; for s in $(BENCH_SCRIPTS); do \
		echo "== benchmarks/$$s.py"; \
		$(BENCH_NICE) $(BIN)/python benchmarks/$$s.py || status=1; \
	done; $(BIN)/python benchmarks/report.py || status=1; exit $$status

bench-quick: export BENCH_B1_SIZES ?= 1,3
bench-quick: export BENCH_B2_MIB ?= 16
bench-quick: export BENCH_B2_REPEAT ?= 1
bench-quick: export BENCH_B3_REPEAT ?= 1
bench-quick: export BENCH_B4_REPEAT ?= 1
bench-quick: export BENCH_B4_FAULTY ?= 0
bench-quick: export BENCH_B5_HOSTS ?= 4
bench-quick: bench

bench-b1 bench-b2 bench-b3 bench-b4 bench-b5 bench-b6: setup bench-deps
	$(BENCH_NICE) $(BIN)/python benchmarks/$(filter $(subst bench-,,$@)_%,$(BENCH_SCRIPTS)).py

bench-report:
	$(BIN)/python benchmarks/report.py

bench-profile: setup bench-deps
	$(BENCH_NICE) $(BIN)/python benchmarks/profile_upgrade.py
