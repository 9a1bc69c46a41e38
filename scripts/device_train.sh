#!/usr/bin/env bash
# Train the default model further on a lent GPU machine (.library/device), then check the CUDA restore.
#
# That machine has python3 with PyTorch, numpy, scipy, scikit-image, pyyaml, tqdm and matplotlib, but
# not MONAI and not ../shared: scripts/device_kit.py packs the data (a float16 slice store) and the
# missing wheels into .device_kit, which the call carries. From the repository root there:
#
#   bash scripts/device_train.sh MINUTES [config overrides...]     # e.g. 6 model.num_res_units=3
#
# MINUTES is the training's wall-clock budget (optim.max_minutes: the cosine schedule is fitted to the
# epochs that fit). What comes back in $OUT (at most 8 files): model.pt (best validation epoch),
# model-last.pt, train.log, tracking.tar (the MLflow records, kept locally because the device has no
# mlflow: `medvae track sync` them here), device.json (GPU, speeds, CUDA-vs-CPU restore agreement).
# A rehearsal on this CPU: DEVICE=cpu PY=/path/to/bare/python KIT=/tmp/kit OUT=/tmp/out bash $0 1.5 ...
set -euo pipefail
MINUTES=${1:?usage: device_train.sh MINUTES [overrides...]}
shift
KIT=${KIT:-.device_kit}
OUT=${OUT:-runs/device-out}
WORK=${WORK:-/tmp/medvae-device}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
WORKERS=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1

"$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$WORK/site" "$KIT"/wheels/*.whl
export PYTHONPATH="$WORK/site:$PWD"
rm -rf "$WORK/store" "$WORK/run"
tar -xJf "$KIT/store.tar.xz" -C "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

# batch 64 and lr 3e-4: four times v11's batch at twice its rate; the epochs are large so that the
# validation (7 volumes of the kit) costs little; the budget decides how many run
"$PY" -m medvae train --config default data.store="$WORK/store" init_from=medvae/weights/default.pt \
    device="$DEVICE" amp=bf16 data.num_workers="$WORKERS" optim.batch_size=64 optim.lr=3.0e-4 \
    data.samples_per_epoch=131072 optim.epochs=400 optim.max_minutes="$MINUTES" \
    output_dir="$WORK/run" tracking.run_name=default-model-device tracking.log_model=false "$@" \
    2>&1 | tee "$OUT/train.log" || rc=${PIPESTATUS[0]}
# 3: trained, with the tracking records kept locally (no mlflow there), as intended
[ "${rc:-0}" -eq 0 ] || [ "${rc:-0}" -eq 3 ] || exit "$rc"

"$PY" - "$WORK" "$OUT" "$DEVICE" <<'EOF'
import json, sys, time
from pathlib import Path
import numpy as np
import torch
from medvae.restore import restore_volume
from medvae.store import SliceStore
from medvae.training.loop import export_inference

work, out, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
run = work / "run"
export_inference(run / "last.pt", out / "model-last.pt")
(out / "model.pt").write_bytes((run / "model.pt").read_bytes())
info = {"torch": torch.__version__, "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
ck = torch.load(run / "last.pt", weights_only=True)
info.update(epochs=ck["epoch"] + 1, planned_epochs=ck.get("planned_epochs"), steps=ck["step"],
            meta={k: v for k, v in ck["meta"].items() if isinstance(v, (int, float))})
# restore the largest MR volume of the store on the device and 16 of its slices on the CPU too
store = SliceStore(work / "store")
rec = max((r for r in store.records if r.modality == "MR"), key=lambda r: int(np.prod(r.shape)))
vol = np.moveaxis(np.asarray(store.open_volume(rec.key), dtype=np.float32), 0, -1)
sub = vol[:, :, vol.shape[2] // 2 - 8: vol.shape[2] // 2 + 8]
timing = {}
for dev, v in ((device, vol), (device, sub), ("cpu", sub)):
    for samples in (0, 8):
        restore_volume(v[:, :, :2], model=str(run / "model.pt"), modality="MR", device=dev, samples=samples)  # warm
        t = time.perf_counter()
        mean, std = restore_volume(v, model=str(run / "model.pt"), modality="MR", device=dev, samples=samples)
        timing[f"{dev}_{v.shape[2]}slices_samples{samples}_s"] = round(time.perf_counter() - t, 3)
        if v is sub:
            timing.setdefault("means", {})[f"{dev}_{samples}"] = mean
info["restore_shape"] = list(vol.shape)
means = timing.pop("means")
info["restore"] = timing
# the same slices on both devices: how far apart, in units of the volume's window (data range 1)
info["cuda_vs_cpu_max_abs"] = {s: float(np.abs(means[f"{device}_{s}"] - means[f"cpu_{s}"]).max()) for s in (0, 8)}
(out / "device.json").write_text(json.dumps(info, indent=1))
print(json.dumps(info, indent=1))
EOF
tar -C "$WORK/run" -cf "$OUT/tracking.tar" $(cd "$WORK/run" && ls -d tracking_pending* mlflow_run_id 2>/dev/null)
ls -la "$OUT"
