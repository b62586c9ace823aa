#!/usr/bin/env bash
# Per-core scaling of the engine (null and malloc bdevs at 1, 2, 4, 8 and 14 cores), plus the
# raw-vs-engine comparisons and the idle figure, on whatever machine runs it. Meant for a
# many-core machine; prints JSON lines into $RESULTS (default perf/results/run-<host>-<date>).
# Usage: perf/scaling.sh [path-to-cairn-perf] ; set DISK_FILE to choose the benchmark file.
set -u
P=${1:-target/release/cairn-perf}
RESULTS=${RESULTS:-perf/results/run-$(hostname)-$(date +%Y%m%d)}
DISK_FILE=${DISK_FILE:-/var/tmp/cairn-perf.img}
RUNTIME=${RUNTIME:-3}
mkdir -p "$RESULTS"
ncpu=$(nproc)
{ echo "nproc $ncpu"; lscpu | grep -E 'Model name|Socket|NUMA node\(s\)|Thread'; uname -r; } >"$RESULTS/machine.txt"

scale() { # bdev rw qd
  for n in 1 2 4 8 14; do
    [ "$n" -le "$ncpu" ] || continue
    r=$("$P" run --target engine --bdev "$1" --rw "$2" --qd "$3" --cores "$n" --size 4G --runtime "$RUNTIME" --json) || r='{"error":true}'
    echo "{\"bdev\":\"$1\",\"rw\":\"$2\",\"qd\":$3,\"cores\":$n,\"result\":$r}"
  done
}
scale null randread 128 >"$RESULTS/scaling-null.jsonl"
scale malloc randread 32 >"$RESULTS/scaling-malloc-randread.jsonl"
scale malloc randwrite 32 >"$RESULTS/scaling-malloc-randwrite.jsonl"
"$P" idle --cores 2 --seconds 10 --json >"$RESULTS/idle.json"
for rw in randread randwrite; do
  "$P" compare --file "$DISK_FILE" --size 4G --rw "$rw" --qd 32 --runtime "$RUNTIME" --rounds 3 --json \
    >"$RESULTS/compare-$rw-qd32.json"
done
"$P" compare --file "$DISK_FILE" --size 4G --rw randread --qd 1 --runtime "$RUNTIME" --rounds 3 --json \
  >"$RESULTS/compare-randread-qd1.json"
rm -f "$DISK_FILE"
python3 - "$RESULTS" <<'PY' || true
import json, sys, glob, os
d = sys.argv[1]
for f in sorted(glob.glob(os.path.join(d, "scaling-*.jsonl"))):
    print(os.path.basename(f))
    base = None
    for line in open(f):
        r = json.loads(line)
        iops = r["result"].get("iops", 0)
        base = base or iops
        print(f"  cores {r['cores']:>2}: {iops/1e6:8.2f} M IOPS  x{iops/base:5.2f}  p99 {r['result'].get('lat_us',{}).get('p99',0):.1f} us")
for f in sorted(glob.glob(os.path.join(d, "compare-*.json"))):
    r = json.load(open(f))
    print(f"{os.path.basename(f)}: ratio_iops {r['ratio_iops']:.3f} ratio_p99 {r['ratio_p99']:.3f} "
          f"raw p99 {[round(x['lat_us']['p99'],1) for x in r['baseline']]} engine p99 {[round(x['lat_us']['p99'],1) for x in r['candidate']]} "
          f"raw iops {[round(x['iops']) for x in r['baseline']]} engine iops {[round(x['iops']) for x in r['candidate']]}")
print(open(os.path.join(d, "idle.json")).read())
PY
