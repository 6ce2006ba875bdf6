#!/usr/bin/env bash
# The GPU checks of issues 9 and 10 as one run of at most ~8 minutes on one H100/H200, ending in one
# table: extraction images/s and regions/s for bb and bl (random weights of the real shapes, 16 boxes
# per 1024-px JPEG, 2,000 images) with the time split and GPU memory; the extraction workers' CPU cost
# per image; training's streaming rate against the I/O ceiling (bl); evaluation scoring.
#
#   bash scripts/gpu_check.sh            # logs and JSON figures in $OUT (the device tool) or /tmp/gpu_check
#
# Python packages the machine lacks travel as wheels in .whl/ (README "Performance"); the script installs
# them into /tmp/site when the folder exists. Set GPU_CHECK_IMAGES to run a shorter extraction.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-/tmp/gpu_check}
mkdir -p "$LOG"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
IMAGES=${GPU_CHECK_IMAGES:-2000}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG/device.txt"

run() {  # run NAME SECONDS COMMAND...: its output to $LOG/NAME.log, a failure noted but not fatal
  local name=$1 seconds=$2
  shift 2
  echo "== $name: $*"
  timeout "$seconds" "$@" >"$LOG/$name.log" 2>&1 || echo "gpu_check: $name failed or timed out (see $LOG/$name.log)"
  tail -n 4 "$LOG/$name.log"
}

for preset in bb bl; do
  run "extract_$preset" 170 "$PY" scripts/bench_extract.py --backbones "$preset" --random-weights \
    --images "$IMAGES" --boxes 16 --image-size 1024 --batch-size 32 --workers 8 --json "$LOG/extract_$preset.json"
done
run data_path 60 "$PY" scripts/bench_extract.py --data-path --images 64
run train 120 "$PY" scripts/bench_train.py --size bl --skip-official
run eval 90 "$PY" scripts/bench_eval.py --scale 0.05 --device cuda --json "$LOG/eval.json"

"$PY" - "$LOG" <<'EOF'
import json, re, sys
from pathlib import Path

log = Path(sys.argv[1])
rows = [("device", (log / "device.txt").read_text().strip())]
for preset in ("bb", "bl"):
    f = log / f"extract_{preset}.json"
    if f.exists():
        d = json.loads(f.read_text())
        rows.append((f"extract {preset}: images/s, regions/s",
                     f"{d.get('images_per_s', 0):.0f}, {d.get('regions_per_s', 0):.0f} (goal bl >= 400 images/s; first bar 250)"))
        rows.append((f"extract {preset}: GPU peak, KiB/image", f"{d.get('gpu_peak_gib') or 0:.1f} GiB, {d['kib_per_image']:.0f}"))
        rows.append((f"extract {preset}: time split", d.get("split", "?")))
    else:
        rows.append((f"extract {preset}", "no figures (see its log)"))

def grep(name, pattern):
    f = log / f"{name}.log"
    m = re.search(pattern, f.read_text()) if f.exists() else None
    return m[1] if m else "?"

rows.append(("worker cpu ms/img (goal <= 2)", grep("data_path", r"worker cpu ms/img: ([\d.]+)")))
rows.append(("jpeg decode alone ms/img", grep("data_path", r"jpeg decode alone ms/img: ([\d.]+)")))
rows.append(("train bl: stream samples/s per core", grep("train", r"stream samples/s per core: ([\d.]+)")))
rows.append(("train bl: raw read samples/s", grep("train", r"raw read samples/s: ([\d.]+)")))
rows.append(("train bl: read + checksum alone samples/s per core", grep("train", r"read \+ checksum alone samples/s per core: ([\d.]+)")))
rows.append(("train bl: CPU us per sample with one worker", grep("train", r"stream with one worker, CPU per sample: ([\d.]+)")))
rows.append(("train bl: streaming / I/O-or-compute bound (goal >= 0.9)", grep("train", r"streaming / min\(a cold, b\) = ([\d.]+)")))
e = log / "eval.json"
rows.append(("eval (5% of LVIS val scale)", e.read_text().strip().replace("\n", " ")[:200] if e.exists() else "see eval.log"))
width = max(len(k) for k, _ in rows)
print()
for k, v in rows:
    print(f"| {k:<{width}} | {v} |")
EOF
