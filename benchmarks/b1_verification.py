"""B1 verification cost vs fleet size: Sigstore verifications and downloads per upgrade run on 1, 5, 20 hosts.

Goal: exactly one of each per (tag, asset), whatever the fleet size. Evidence, both real:
- downloads: the release server's request log (every answered GET, per file);
- verifications: the results of cara_release (captured by the timing callback): each run reports every asset it
  verified (`assets`, with `cached` and the Rekor `log_index`) and whether the signed SHA256SUMS.txt was used;
- and the fleet report: every host was upgraded to the one verified digest.

    BENCH_B1_SIZES (1,5,20)
"""

import collections

import benchlib
from fleetrun import RECOMMENDED, BenchFleet, Settings

SUMS = "SHA256SUMS.txt"


def count_downloads(requests):
    """{file name: answered GETs} for the release files (not the release notes)."""
    counts = collections.Counter()
    for path, status in requests:
        if status == 200 and "/releases/download/" in path:
            counts[path.rsplit("/", 1)[-1]] += 1
    return dict(counts)


def count_verifications(run):
    """{(tag, file): Sigstore verifications} from the cara_release results of one run; and the digests seen."""
    counts = collections.Counter()
    digests = {}
    tasks = run.tasks(action="cara_release")
    for task in tasks:
        for release in task.get("result", {}).get("release_runs", []):
            for name, asset in release["assets"].items():
                counts[(release["tag"], name)] += 1
                digests[(release["tag"], name)] = asset["sha256"]
            if release["checksums_present"]:
                counts[(release["tag"], SUMS)] += 1
    return dict(counts), digests, len(tasks)


def measure(size, settings):
    with BenchFleet("b1-%d" % size, size, settings=settings) as fleet:
        run = fleet.upgrade().check("B1 upgrade on %d hosts" % size)
        downloads = count_downloads(fleet.server.requests)
    verifications, digests, release_tasks = count_verifications(run)
    rows = run.report()["hosts"]
    upgraded = [r for r in rows if r["result"] == "upgraded"]
    one_digest = {r["sha256"] for r in upgraded} == set(digests.values())
    return {"size": size, "downloads": downloads, "verifications": verifications, "release_tasks": release_tasks,
            "upgraded": len(upgraded), "one_digest": one_digest, "wall": run.wall}


def main():
    benchlib.ensure_reaped()
    settings = Settings.from_env(**RECOMMENDED)
    results = benchlib.Results("B1", "verification cost vs fleet size")
    sizes = benchlib.env_ints("BENCH_B1_SIZES", "1,5,20")
    base = None
    for size in sizes:
        m = measure(size, settings)
        base = base or m
        per_file = sorted(m["downloads"].values())
        per_pair = sorted(m["verifications"].values())
        exact_downloads = bool(per_file) and set(per_file) == {1}
        exact_verifications = bool(per_pair) and set(per_pair) == {1}
        results.figure("downloads per file, %d hosts" % size, max(per_file or [0]), "GETs",
                       baseline=max(base["downloads"].values() or [0]), goal="exactly 1 per (tag, asset)",
                       met=exact_downloads,
                       detail="%d files fetched (%s); %d of %d hosts upgraded, %s"
                              % (len(per_file), ", ".join("%s x%d" % kv for kv in sorted(m["downloads"].items())),
                                 m["upgraded"], size, "all to the one verified digest" if m["one_digest"]
                                 else "NOT all to the verified digest"))
        results.figure("Sigstore verifications per (tag, file), %d hosts" % size, max(per_pair or [0]), "verifications",
                       baseline=max(base["verifications"].values() or [0]), goal="exactly 1 per (tag, asset)",
                       met=exact_verifications and m["one_digest"],
                       detail="%d cara_release task run(s): %s; upgrade run %.1f s"
                              % (m["release_tasks"], ", ".join("%s %s x%d" % (t, n, c) for (t, n), c
                                                               in sorted(m["verifications"].items())), m["wall"]))
    results.note("settings: " + settings.label())
    results.save()


if __name__ == "__main__":
    main()
