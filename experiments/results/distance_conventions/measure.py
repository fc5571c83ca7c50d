"""medpy vs MONAI HD95 / ASD on real ACDC geometry: each validation patient's ED label scored as a
prediction of its ES label (same volume shape), in both conventions, with the time per volume.

Run from the repository root: PYTHONPATH=$PWD python experiments/results/distance_conventions/measure.py
"""
import time, h5py, numpy as np
from pathlib import Path
from kdseg.metrics import volume_metrics
root = Path(__file__).resolve().parents[4] / "shared/data/acdc"  # ../shared/data beside the repository
patients = (root / "splits/val.txt").read_text().split()
rows = []
t = {"medpy": 0.0, "monai": 0.0}
for p in patients:
    frames = sorted((root / "volumes").glob(f"{p}_frame*.h5"))
    labels = [h5py.File(f, "r")["label"][:].astype(np.int64) for f in frames]
    pred, gt = labels[0], labels[1]  # ED label scored as a prediction of the ES label
    res = {}
    for conv in ("medpy", "monai"):
        t0 = time.perf_counter(); res[conv] = volume_metrics(pred, gt, 4, convention=conv); t[conv] += time.perf_counter() - t0
    for c in (1, 2, 3):
        a, b = res["medpy"][c], res["monai"][c]
        rows.append((p, c, a.status, a.hd95, b.hd95, a.asd, b.asd))
ok = [r for r in rows if r[2] == "ok"]
dh = np.array([r[3] - r[4] for r in ok]); da = np.array([r[5] - r[6] for r in ok])
print(f"{len(patients)} patients, {len(ok)} (volume, class) pairs ok, statuses {sorted(set(r[2] for r in rows))}")
print(f"HD95 medpy - monai: mean {dh.mean():.3f}, min {dh.min():.3f}, max {dh.max():.3f}, max |d| {np.abs(dh).max():.3f} px")
print(f"ASD  medpy - monai: mean {da.mean():.3f}, min {da.min():.3f}, max {da.max():.3f}, max |d| {np.abs(da).max():.3f} px")
print(f"mean over pairs: HD95 medpy {np.mean([r[3] for r in ok]):.3f} monai {np.mean([r[4] for r in ok]):.3f}; ASD medpy {np.mean([r[5] for r in ok]):.3f} monai {np.mean([r[6] for r in ok]):.3f}")
print(f"time per volume (3 classes): medpy {t['medpy']/len(patients):.3f} s, monai {t['monai']/len(patients):.3f} s")
