#!/usr/bin/env bash
# One-shot GPU check for the device machine (one NVIDIA H200, python3 = 3.12 with torch there; nothing
# can be downloaded). Run from the repo root with $OUT set and the wheels of the packages the image lacks
# in .whl/ (carried); everything it prints goes to $OUT/gpu.log, each step's JSON to $OUT/<step>.json.
#
#   bash bench/gpu_check.sh                  # on the GPU machine (about 4-5 minutes)
#   GPU_CHECK_TINY=1 GPU_CHECK_NO_WHEELS=1 PY=.venv/bin/python OUT=/tmp/o bash bench/gpu_check.sh
#                                            # here, on CPU, tiny sizes: checks the commands and arguments
#
# Steps (each under `timeout`; a failed step prints its exit code and the next one runs; GPU_CHECK_STEPS="kd eager"
# runs only those):
#   env        nvidia-smi, torch version / CUDA / device name, where pydantic and torch are imported from
#   train_loop bench/train_loop.py --device cuda (ours = train_local, CUDA + AMP, vs bare loops on CUDA + AMP)
#   train_cuda the agent's train_local on CUDA vs a bare PyTorch loop on CUDA (fp32, AMP), with loader
#              workers and with batches already on the GPU (the compute ceiling), same images
#   kd         server-side KD (cloud.strategy.kd: embed_public teachers + distill) on CPU vs CUDA
#   eager      the torch eager feature path (ReIDModel.embed, SiteData.evaluate) on CPU vs CUDA
if [ "${GPU_CHECK_NO_WHEELS:-0}" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
  # pydantic 2.14 needs typing-extensions >= 4.16: carried in .whl/opt, installed only if the image's is older
  python3 -c "import importlib.metadata as m, sys; sys.exit(tuple(map(int, m.version('typing_extensions').split('.')[:2])) < (4, 16))" 2>/dev/null \
    || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/opt/*.whl \
    || exit 1
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
: "${OUT:?set OUT to the folder whose files come back}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 OUT
PY=${PY:-python3}
TINY=${GPU_CHECK_TINY:-0}
if [ "$TINY" = 1 ]; then
  export GC_ARCH=resnet18 GC_H=64 GC_W=32 GC_IMAGES=96 GC_REPEATS=1 GC_WORKERS=2 GC_PUBLIC=64 GC_TEACHERS=2
  TRAIN_LOOP_ARGS="--arch resnet18 --height 64 --width 32 --images 64 --repeats 1 --device cpu"
else
  export GC_ARCH=resnet50 GC_H=256 GC_W=128 GC_IMAGES=2048 GC_REPEATS=3 GC_WORKERS=8 GC_PUBLIC=384 GC_TEACHERS=3
  TRAIN_LOOP_ARGS="--arch resnet50 --images 2048 --repeats 3 --device cuda"
fi

RESULTS=()
step() {  # step NAME SECONDS COMMAND...: run under timeout, print and keep the exit code, never stop
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then return; fi
  echo "===== step $name (timeout ${limit}s): $*"
  timeout -k 10 "$limit" "$@"
  rc=$?
  echo "===== step $name: exit $rc after $((SECONDS - t0)) s"
  RESULTS+=("$name=$rc($((SECONDS - t0))s)")
}

main() {
echo "gpu_check: $(date -u +%FT%TZ) tiny=$TINY python=$($PY -c 'import sys; print(sys.version.split()[0])') cores=$(nproc)"

step env 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || echo 'no nvidia-smi'
$PY -c 'import torch, pydantic, numpy; print(\"torch\", torch.__version__, \"cuda\", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"-\", \"| numpy\", numpy.__version__, numpy.__file__, \"| pydantic\", pydantic.VERSION, pydantic.__file__, \"| torch from\", torch.__file__)'
$PY -c 'import importlib.metadata as m; print(\"typing_extensions\", m.version(\"typing_extensions\"), \"| onnxruntime providers\", __import__(\"onnxruntime\").get_available_providers())'"

# b1. bench/train_loop.py --device cuda: ours (train_local, CUDA + AMP) vs the bare loops on CUDA with AMP.
step train_loop 120 $PY bench/train_loop.py $TRAIN_LOOP_ARGS --out "$OUT/train_loop.json"

# b2. the same comparison with everything on the GPU, same images, one epoch per run, interleaved, medians.
step train_cuda 120 $PY - <<'EOF'
import json, os, statistics, sys, tempfile, time
from pathlib import Path
import torch
from torch import nn
from torch.utils.data import DataLoader
sys.path.insert(0, "bench")
from train_loop import PlainDataset  # bench/train_loop.py's bare dataset (decode + paper transform)
from reid.data import InputSpec
from reid.data.loading import Batch
from reid.model import ModelSpec, build_model
from reid.site import SiteData
from reid.synthetic import SyntheticConfig, generate_federation
from reid.train import TrainConfig, make_optimizer, resolve_device, train_local

arch, h, w = os.environ["GC_ARCH"], int(os.environ["GC_H"]), int(os.environ["GC_W"])
n_images, repeats, workers = int(os.environ["GC_IMAGES"]), int(os.environ["GC_REPEATS"]), int(os.environ["GC_WORKERS"])
config = TrainConfig(epochs=1, seed=0)  # device auto, amp on: the agent's settings
device = resolve_device(config.device)
spec = ModelSpec(arch=arch)
sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

def bare(site, amp):
    torch.manual_seed(0)
    model = build_model(spec, site.num_classes).to(device).train()
    opt, crit = make_optimizer(model, config), nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")
    loader = DataLoader(PlainDataset(site), batch_size=config.batch_size, shuffle=True, drop_last=True,
                        pin_memory=device.type == "cuda")
    n, start = 0, time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        n += len(y)
    sync()
    return n / (time.perf_counter() - start)

def ours(loader, num_classes):
    torch.manual_seed(0)
    return train_local(build_model(spec, num_classes), loader, config).images_per_s

with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    generate_federation(SyntheticConfig(sites=1, train_images_max=n_images, public_images=0, height=h,
                                        width=w, images_per_id_max=8), tmp)
    print(f"synthetic site: {time.perf_counter() - t:.1f} s", flush=True)
    root = Path(tmp) / "sites" / "site00"
    site = SiteData(root, InputSpec(height=h, width=w))
    site_w = SiteData(root, InputSpec(height=h, width=w), num_workers=workers)
    # the agent's batches, decoded once and put on the device: train_local without its data loading
    preloaded = [Batch(b.images.to(device), b.labels.to(device), b.indices, b.skipped) for b in site.train_loader()]
    runs = {
        "ours": lambda: ours(site.train_loader(), site.num_classes),
        f"ours_workers{workers}": lambda: ours(site_w.train_loader(), site.num_classes),
        "ours_preloaded_on_device": lambda: ours(preloaded, site.num_classes),
        "bare_fp32": lambda: bare(site, amp=False),
        "bare_amp": lambda: bare(site, amp=True),
    }
    ours(preloaded, site.num_classes); bare(site, amp=True)  # warm-up: CUDA context, cuDNN, page cache
    results = {k: [] for k in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            results[name].append(runs[name]())
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in results.items()) + " img/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    summary = {
        "benchmark": "train_cuda", "device": str(device), "amp": config.amp and device.type == "cuda",
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "torch": torch.__version__,
        "arch": arch, "input": f"{h}x{w}", "train_images": site.num_train_images, "batch": config.batch_size,
        "cpu_threads": torch.get_num_threads(), "cores": os.cpu_count(),
        "images_per_s": results, "median_images_per_s": med,
        "ratio_ours_vs_bare_amp": med["ours"] / med["bare_amp"],
        "ratio_ours_vs_bare_fp32": med["ours"] / med["bare_fp32"],
        "ratio_ours_vs_preloaded": med["ours"] / med["ours_preloaded_on_device"],
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    Path(os.environ["OUT"], "train_cuda.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("device", "amp", "median_images_per_s", "ratio_ours_vs_bare_amp",
                                              "ratio_ours_vs_preloaded", "max_memory_gib")}, indent=1))
EOF

# c. server-side KD, as cloud/server.py runs it (teachers' embeddings of the public set through
# embed_public with make_loader(public, 64), then distill on make_loader(public, kd.batch_size, train)),
# on the CPU and on CUDA, same images and weights. statistics=True (bn=local): a student from random init.
step kd 70 $PY - <<'EOF'
import json, os, tempfile, time
from pathlib import Path
import torch
from torch.utils.data import Subset
from cloud.strategy.kd import KDConfig, KDDiverged, TeacherMean, distill, embed_public
from reid.data import ImageDataset, InputSpec, eval_transform, make_loader
from reid.data.layouts import read_image_folder
from reid.model import ModelSpec, build_model
from reid.synthetic import SyntheticConfig, generate_federation

arch, h, w = os.environ["GC_ARCH"], int(os.environ["GC_H"]), int(os.environ["GC_W"])
n_public, n_teachers = int(os.environ["GC_PUBLIC"]), int(os.environ["GC_TEACHERS"])
# the aggregator's defaults (1 epoch, batch 32, SGD) but lr 1e-5: from random init a ResNet-50 student
# diverges at 5e-4 within a few batches (KDDiverged); the time per batch does not depend on lr
cfg = KDConfig(lr=1e-5)
spec = ModelSpec(arch=arch)
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

def sync(d):
    if d == "cuda":
        torch.cuda.synchronize()

with tempfile.TemporaryDirectory() as tmp:
    generate_federation(SyntheticConfig(sites=1, train_images_max=8, public_images=n_public, height=h, width=w), tmp)
    public = ImageDataset(read_image_folder(Path(tmp) / "public"), eval_transform(InputSpec(height=h, width=w)))
    n = len(public)
    t = time.perf_counter()
    for _ in make_loader(public, 64, train=False):
        pass
    loader_s = time.perf_counter() - t
    weights = []
    for seed in range(n_teachers + 1):
        torch.manual_seed(seed)
        weights.append(build_model(spec).state_dict())
    out, targets = {}, {}
    for d in devices:
        teachers = TeacherMean(cfg.normalize)
        model = build_model(spec)
        model.load_state_dict(weights[1])
        model.to(d)
        embed_public(model, make_loader(Subset(public, range(min(n, 64))), 64, train=False), min(n, 64), d)  # warm-up
        sync(d)
        t = time.perf_counter()
        for k in range(1, n_teachers + 1):
            model.load_state_dict(weights[k])
            teachers.add(embed_public(model, make_loader(public, 64, train=False), n, d))
        sync(d)
        teach_s = time.perf_counter() - t
        targets[d] = teachers.target()
        student = build_model(spec)
        student.load_state_dict(weights[0])
        student.to(d)
        torch.manual_seed(0)
        loader = make_loader(public, cfg.batch_size, train=True, seed=0)
        t = time.perf_counter()
        try:
            res = distill(student, loader, targets[d], cfg, d, statistics=True)
        except KDDiverged as err:
            print(d, "KD diverged:", err, flush=True)
            out[d] = {"teachers_s": teach_s, "diverged": str(err)}
            continue
        sync(d)
        kd_s = time.perf_counter() - t
        out[d] = {
            "teachers_s": teach_s, "teacher_images_per_s": n * n_teachers / teach_s,
            "distill_s_with_bn_estimate": kd_s, "distill_s": res.seconds,
            "distill_images_per_s": res.batches * cfg.batch_size / res.seconds,
            "batches": res.batches, "mse_first": res.loss_first, "mse_last": res.loss_last,
            "kd_total_s": teach_s + kd_s,
        }
        print(d, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out[d].items()}), flush=True)
    summary = {"benchmark": "kd", "arch": arch, "input": f"{h}x{w}", "public_images": n, "teachers": n_teachers,
               "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "cores": os.cpu_count(),
               "gpu": torch.cuda.get_device_name(0) if "cuda" in devices else None,
               "public_loader_only_s": loader_s, "public_loader_images_per_s": n / loader_s, "by_device": out}
    if "cuda" in out and "distill_s" in out["cuda"] and "distill_s" in out["cpu"]:
        summary["cuda_speedup_teachers"] = out["cpu"]["teachers_s"] / out["cuda"]["teachers_s"]
        summary["cuda_speedup_distill"] = out["cpu"]["distill_s"] / out["cuda"]["distill_s"]
        summary["cuda_speedup_total"] = out["cpu"]["kd_total_s"] / out["cuda"]["kd_total_s"]
        summary["target_min_cosine_cpu_vs_cuda"] = float(torch.nn.functional.cosine_similarity(
            targets["cpu"].double(), targets["cuda"].double(), dim=1).min())
    Path(os.environ["OUT"], "kd.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "by_device"}, indent=1))
EOF

# d. the torch eager feature path on CUDA: ReIDModel.embed (what inference.py times as eager) at batch
# 1 / 32 / 256, fp32 NCHW and channels_last, fp16 and bf16 autocast, vs the CPU; and SiteData.evaluate
# (reid.evaluate.extract_features, what `edge-agent evaluate --device` runs) end to end on both.
step eager 70 $PY - <<'EOF'
import json, os, statistics, tempfile, time
from pathlib import Path
import torch
from reid.data import InputSpec
from reid.model import ModelSpec, build_model
from reid.site import SiteData
from reid.synthetic import SyntheticConfig, generate_federation

arch, h, w = os.environ["GC_ARCH"], int(os.environ["GC_H"]), int(os.environ["GC_W"])
cuda = torch.cuda.is_available()
torch.manual_seed(0)
model = build_model(ModelSpec(arch=arch)).eval()
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}

def embed(d, precision, x):
    with torch.inference_mode(), torch.autocast(d, dtype=DTYPES[precision], enabled=DTYPES[precision] is not None):
        return model.embed(x)

rows = []
def bench(d, precision, layout, batch, seconds):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model.to(d, memory_format=fmt)
    x = torch.randn(batch, 3, h, w, device=d).contiguous(memory_format=fmt)
    embed(d, precision, x); embed(d, precision, x)  # warm-up
    times = []
    for _ in range(3):
        calls, t = 0, time.perf_counter()
        while True:
            embed(d, precision, x); calls += 1
            if d == "cuda":
                torch.cuda.synchronize()
            if time.perf_counter() - t > seconds or calls >= 200:
                break
        times.append((time.perf_counter() - t) / calls)
    s = statistics.median(times)
    rows.append({"device": d, "precision": precision, "layout": layout, "batch": batch,
                 "ms_per_call": s * 1e3, "images_per_s": batch / s})
    print(f"{d:4} {precision} {layout:13} batch {batch:4}: {s * 1e3:8.2f} ms {batch / s:9.1f} img/s", flush=True)

for b in (1, 32):
    for layout in ("nchw", "channels_last"):
        bench("cpu", "fp32", layout, b, 0.3)
if cuda:
    for b in (1, 32, 256):
        for precision, layout in (("fp32", "nchw"), ("fp32", "channels_last"), ("fp16", "nchw"),
                                  ("fp16", "channels_last"), ("bf16", "channels_last")):
            bench("cuda", precision, layout, b, 0.2)

quality = {}  # min cosine of 32 embeddings on CUDA against the CPU's fp32 ones (same weights, same input)
torch.manual_seed(1)
x = torch.randn(32, 3, h, w)
model.to("cpu", memory_format=torch.contiguous_format)
ref = embed("cpu", "fp32", x).float()
if cuda:
    model.to("cuda")
    for precision in DTYPES:
        got = embed("cuda", precision, x.cuda()).float().cpu()
        quality[precision] = float(torch.nn.functional.cosine_similarity(ref, got, dim=1).min())

evaluate = {}
with tempfile.TemporaryDirectory() as tmp:
    generate_federation(SyntheticConfig(sites=1, train_images_max=64, public_images=0, height=h, width=w,
                                        min_test_ids=12), tmp)
    site = SiteData(Path(tmp) / "sites" / "site00", InputSpec(height=h, width=w))
    crops = len(site.splits.query) + len(site.splits.gallery)
    for d in ["cpu"] + (["cuda"] if cuda else []):
        model.to(d, memory_format=torch.contiguous_format)
        site.evaluate(model, d)  # warm-up (and the crops decoded once and kept in memory, as the agent does)
        t = time.perf_counter()
        metrics = site.evaluate(model, d)
        s = time.perf_counter() - t
        evaluate[d] = {"seconds": s, "crops": crops, "crops_per_s_with_flip": crops / s,
                       "rank1": metrics.summary()["rank1"]}
        print(d, "SiteData.evaluate:", json.dumps(evaluate[d]), flush=True)
summary = {"benchmark": "eager", "arch": arch, "input": f"{h}x{w}", "torch": torch.__version__,
           "cpu_threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(0) if cuda else None,
           "throughput": rows, "min_cosine_vs_cpu_fp32_batch32": quality, "site_evaluate": evaluate}
Path(os.environ["OUT"], "eager.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({"min_cosine_vs_cpu_fp32_batch32": quality}))
EOF

echo "gpu_check summary: ${RESULTS[*]}"
ls -la "$OUT"
}

main 2>&1 | tee "$OUT/gpu.log"
