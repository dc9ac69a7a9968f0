"""Our pipeline against the original notebook's method, in one run, on the same machine and test images.

    python -m bench.compare_baseline                 # the real data, full settings (long: tens of minutes)
    python -m bench.compare_baseline --limit 30 --epochs 1 --image-size 64   # smoke test, a few minutes

Writes bench/results/baseline_comparison.json and prints a Markdown table. Details: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from bench import REAL_DATA, ROOT, real_data
from bench import baseline_notebook as baseline
from kneexray import DEFAULT_CLASSES
from kneexray.report.figures import format_with_ci

MODELS = ("cnn", "resnet")
MODEL_TITLES = {"cnn": "CNN", "resnet": "ResNet50"}
TARGETS = {"wall_ratio_max": 1 / 3, "memory_ratio_max": 1.0, "macro_f1_delta_min": 0.0}
SAMPLE_INTERVAL_S = 0.2
NOTEBOOK_IMAGE_SIZE = 224  # the original notebook's input size
COMPARED_PATHS = ("kneexray", "stages", "dvc.yaml", "params.yaml", "requirements.txt")


# ---------------------------------------------------------------------------------------------
# The measuring wrapper (run as its own process)


def _measure_main(out: str, cmd: list[str], cwd: str | None = None) -> int:
    """Run cmd (in cwd); write its wall time, CPU time and peak memory to `out`; exit with its status."""
    import resource

    import psutil

    started = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=cwd)
    root = psutil.Process(child.pid)
    peak_tree = peak_single = samples = 0
    while child.poll() is None:
        total = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for proc in procs:
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            peak_single = max(peak_single, rss)
        peak_tree, samples = max(peak_tree, total), samples + 1
        time.sleep(SAMPLE_INTERVAL_S)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    mib = 1024 * 1024
    Path(out).write_text(
        json.dumps(
            {
                "returncode": child.returncode,
                "wall_s": round(wall, 1),
                "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
                "peak_tree_mib": round(peak_tree / mib, 1),
                "largest_process_mib": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
                "sampled_largest_process_mib": round(peak_single / mib, 1),
                "samples": samples,
                "sample_interval_s": SAMPLE_INTERVAL_S,
            }
        )
    )
    return child.returncode


def measure(cmd: list[str], *, cwd: Path, env: dict, label: str) -> tuple[dict, str]:
    """Run cmd under the wrapper; echo its output (prefixed) to stderr; return (figures, output)."""
    fd, out = tempfile.mkstemp(prefix="kneexray-measure-", suffix=".json")
    os.close(fd)
    try:
        # the wrapper runs from ROOT (where `bench` is importable); cmd runs in cwd
        wrapper = [sys.executable, "-m", "bench.compare_baseline", "_measure", out, "--cwd", str(cwd), "--", *cmd]
        proc = subprocess.Popen(
            wrapper, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        lines = []
        for line in proc.stdout:
            lines.append(line)
            print(f"[{label}] {line}", end="", file=sys.stderr, flush=True)
        proc.wait()
        text = Path(out).read_text()
        figures = json.loads(text) if text else {"returncode": proc.returncode}
    finally:
        Path(out).unlink(missing_ok=True)
    return figures, "".join(lines)


# ---------------------------------------------------------------------------------------------
# Pure helpers


def subset_dataset(data: Path, out: Path, limit: int, seed: int) -> list[Path]:
    """Copy a stratified subset of about `limit` images (same class-folder layout) to `out`; the
    dataset's other files (patient table, README) come along."""
    items = baseline.stratified_subset(baseline.list_class_folder(data), limit, seed)
    for path, _ in items:
        target = out / path.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    for path in data.iterdir():
        if path.is_file():
            shutil.copyfile(path, out / path.name)
    return [path for path, _ in items]


def original_files(split_rows, index, data: Path) -> list[tuple[Path, str]]:
    """Our split rows (path, label) mapped to the original files via index.csv's `source`
    (<label>/<path inside the class folder>), each checked by SHA-256."""
    by_path = index.set_index("path")
    items = []
    for path, label in zip(split_rows["path"], split_rows["label"]):
        row = by_path.loc[path]
        original = data / row["source"]
        if not original.is_file():  # class folder spelt differently: look for the file name in the class
            hits = [p for p in data.rglob(Path(row["source"]).name) if p.is_file()]
            hits = [p for p in hits if hashlib.sha256(p.read_bytes()).hexdigest() == row["sha256"]]
            if not hits:
                raise FileNotFoundError(f"{path}: original {row['source']} not found under {data}")
            original = hits[0]
        elif hashlib.sha256(original.read_bytes()).hexdigest() != row["sha256"]:
            raise ValueError(f"{path}: {original} is not the file our pipeline extracted (SHA-256 differs)")
        items.append((original, label))
    return items


def model_metadata(model_file: Path) -> dict:
    """The kneexray metadata a .keras file carries (epochs_run, weights_source), without TensorFlow."""
    with zipfile.ZipFile(model_file) as archive:
        return json.loads(archive.read("kneexray.json"))


def differing_files(root: Path, clone: Path) -> list[str]:
    """Pipeline files whose working-tree content differs from the committed clone (no git needed)."""
    out = []
    for name in COMPARED_PATHS:
        a, b = root / name, clone / name
        if a.is_file() or b.is_file():
            if not (a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)):
                out.append(name)
            continue
        files = (
            {p.relative_to(a) for p in a.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
            if a.is_dir()
            else set()
        )
        files |= (
            {p.relative_to(b) for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
            if b.is_dir()
            else set()
        )
        for rel in sorted(files):
            if not ((a / rel).is_file() and (b / rel).is_file() and filecmp.cmp(a / rel, b / rel, shallow=False)):
                out.append(f"{name}/{rel.as_posix()}")
    return out


def override_value(overrides: list[str], key: str, default):
    """The value the last `key=value` override gives (as an int where it is one), else default."""
    value = default
    for item in overrides:
        name, _, text = item.partition("=")
        if name.strip() == key:
            value = int(text) if text.strip().lstrip("-").isdigit() else text.strip()
    return value


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def compare(ours: dict, base: dict, y_test, proba_ours: dict, proba_base: dict, *, resamples: int, seed: int) -> dict:
    """Ratios against the targets and the paired macro-F1 differences."""
    out = {
        "wall_ratio": _ratio(ours["run"]["wall_s"], base["run"]["wall_s"]),
        "cpu_ratio": _ratio(ours["run"]["cpu_s"], base["run"]["cpu_s"]),
        "memory_ratio": _ratio(ours["run"]["peak_tree_mib"], base["run"]["peak_tree_mib"]),
        "largest_process_memory_ratio": _ratio(ours["run"]["largest_process_mib"], base["run"]["largest_process_mib"]),
        "targets": TARGETS,
        "macro_f1_delta": {},
    }
    for m in MODELS:
        if m in proba_ours and m in proba_base:
            out["macro_f1_delta"][m] = baseline.paired_delta_ci(
                y_test, proba_ours[m], proba_base[m], resamples=resamples, seed=seed
            )
    out["met"] = {
        "wall": out["wall_ratio"] is not None and out["wall_ratio"] <= TARGETS["wall_ratio_max"],
        "memory": out["memory_ratio"] is not None and out["memory_ratio"] <= TARGETS["memory_ratio_max"],
        **{f"macro_f1_{m}": d["delta"] >= TARGETS["macro_f1_delta_min"] for m, d in out["macro_f1_delta"].items()},
    }
    return out


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def format_table(summary: dict) -> str:
    """The Markdown results: per-model metrics, then whole-run time and memory against the targets."""
    ours, base, comp = summary["ours"], summary["baseline"], summary["comparison"]
    models = [m for m in MODELS if m in ours["models"] and m in base["models"]]
    sizes = summary.get("settings", {}) if "baseline_image_size" in summary.get("settings", {}) else None
    head = "| | " + " | ".join(f"{MODEL_TITLES[m]} ours | {MODEL_TITLES[m]} baseline" for m in models) + " |"
    lines = [
        f"Test set: {summary['test_set']['n_test']} images, the same for both "
        f"({', '.join(f'{c} {n}' for c, n in summary['test_set']['per_class'].items())})."
        + (f" Image size: ours {sizes['image_size']} px, baseline {sizes['baseline_image_size']} px." if sizes else ""),
        "",
        head,
        "|---" * (1 + 2 * len(models)) + "|",
    ]

    def row(title, fn):
        cells = [cell for m in models for cell in (fn(ours["models"][m]), fn(base["models"][m]))]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")

    row("accuracy [95% CI]", lambda r: format_with_ci(r["metrics"], "accuracy", 2))
    row("macro-F1 [95% CI]", lambda r: format_with_ci(r["metrics"], "macro_f1", 2))
    row("osteoporosis recall [95% CI]", lambda r: format_with_ci(r["metrics"], "osteoporosis_recall", 2))
    row("weighted F1 (the notebook's figure)", lambda r: f"{r['metrics']['weighted_f1']:.3f}")
    row("epochs run / max", lambda r: f"{r['epochs_run']} / {r['max_epochs']}")
    row("training time (s)", lambda r: f"{r['train_s']:.0f}" if r.get("train_s") is not None else "n/a")
    row("weights", lambda r: r["weights_source"])
    deltas = comp["macro_f1_delta"]
    lines.append(
        "| macro-F1 ours − baseline [paired 95% CI] | "
        + " | ".join(
            f"{deltas[m]['delta']:+.3f} [{deltas[m]['low']:+.2f}, {deltas[m]['high']:+.2f}] | "
            f"target ≥ 0: {_yes(comp['met'][f'macro_f1_{m}'])}"
            for m in models
        )
        + " |"
    )
    o, b = ours["run"], base["run"]
    lines += [
        "",
        "| whole run (both models) | ours | baseline | ours / baseline | target |",
        "|---|---|---|---|---|",
        f"| wall time (s) | {o['wall_s']:.0f} | {b['wall_s']:.0f} | {comp['wall_ratio']} | "
        f"≤ 0.33: {_yes(comp['met']['wall'])} |",
        f"| CPU time (s) | {o['cpu_s']:.0f} | {b['cpu_s']:.0f} | {comp['cpu_ratio']} | |",
        f"| peak memory, process tree (MiB) | {o['peak_tree_mib']:.0f} | {b['peak_tree_mib']:.0f} | "
        f"{comp['memory_ratio']} | ≤ 1: {_yes(comp['met']['memory'])} |",
        f"| peak memory, largest process (MiB) | {o['largest_process_mib']:.0f} | {b['largest_process_mib']:.0f} | "
        f"{comp['largest_process_memory_ratio']} | |",
    ]
    notes = [
        "",
        "Training time: ours is the DVC stage (Python start, TensorFlow import, decoding once, fit); "
        "the baseline's is model build + fit (decoding every epoch), inside one process.",
    ]
    if any(
        r["weights_source"] == "random" for side in (ours, base) for m, r in side["models"].items() if m == "resnet"
    ):
        notes.append(
            "A ResNet50 ran with RANDOM weights (no ImageNet weights in the Keras cache): "
            "its figures are not transfer learning."
        )
    differs = ours.get("working_tree_differs") or []
    if differs:
        notes.append(
            f"Ours ran the COMMITTED code (a git clone): {len(differs)} pipeline file(s) differ in the working "
            f"tree ({', '.join(differs[:6])}{' ...' if len(differs) > 6 else ''}); commit them to measure them."
        )
    if summary["settings"].get("limit") or summary["settings"].get("epochs_override"):
        notes.append("SMOKE SETTINGS (--limit/--epochs/--image-size): these figures say nothing about the methods.")
    return "\n".join(lines + notes) + "\n"


# ---------------------------------------------------------------------------------------------
# The run


def run_ours(source: Path, scratch: Path, overrides: list[str], env: dict) -> tuple[dict, Path]:
    (scratch / "www").mkdir()
    real_data.pack_nested_zip(source, scratch / "www" / "dataset.zip")
    server, url = real_data.serve(scratch / "www")
    repo = scratch / "repo"
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
        differs = differing_files(ROOT, repo)  # before `-S` rewrites the clone's params.yaml
        sets = ["-S", "dataset.source=url", "-S", f"dataset.url={url}"]
        for item in overrides:
            sets += ["-S", item]
        cmd = ["dvc", "exp", "run", *sets]
        run, log = measure(cmd, cwd=repo, env=env, label="ours")
    finally:
        server.shutdown()
    if run.get("returncode") != 0:
        sys.exit(f"error: our pipeline failed ({' '.join(cmd)}); its output is above")
    ours = {
        "command": " ".join(cmd).replace(url, "<local-url>"),
        "run": run,
        "stage_s": real_data.stage_times(log),
        "working_tree_differs": differs,
        "models": {},
    }
    stage_s = ours["stage_s"]
    for m in MODELS:
        meta = model_metadata(repo / "models" / f"{m}.keras")
        ours["models"][m] = {
            "weights_source": meta["weights_source"],
            "epochs_run": meta["epochs_run"],
            "train_images": meta.get("train_images"),
            "train_s": stage_s.get(f"train_{m}"),
        }
    return ours, repo


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_measure":  # _measure OUT [--cwd DIR] -- CMD...
        sep = sys.argv.index("--")
        options = sys.argv[3:sep]
        cwd = options[options.index("--cwd") + 1] if "--cwd" in options else None
        sys.exit(_measure_main(sys.argv[2], sys.argv[sep + 1 :], cwd))

    import pandas as pd
    import yaml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REAL_DATA))
    parser.add_argument(
        "--limit",
        type=int,
        help="smoke tests: a stratified subset of about N images (copied to /tmp); "
        "also sets split.val_ratio=0.25 for ours unless --set gives it",
    )
    parser.add_argument("--epochs", type=int, help="smoke tests: this many epochs for every model, both methods")
    parser.add_argument(
        "--image-size",
        type=int,
        help="both methods, both models (default: ours params.yaml's, the notebook's its own 224 px)",
    )
    parser.add_argument("--set", action="append", default=[], help="extra `dvc exp run -S` overrides for ours")
    parser.add_argument("--seed", type=int, default=42, help="subset and baseline seed (default 42)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "baseline_comparison.json"))
    args = parser.parse_args()
    data = Path(args.data).resolve()
    if not (data / "normal").is_dir():
        sys.exit(f"error: {data} does not hold the real dataset (normal/, osteopenia/, osteoporosis/)")

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    overrides = []
    if args.image_size:
        overrides += [f"cnn.image_size={args.image_size}", f"resnet.image_size={args.image_size}"]
    if args.epochs:
        overrides += [f"cnn.epochs={args.epochs}", f"resnet.epochs={args.epochs}"]
    if args.limit and not any(s.startswith("split.val_ratio=") for s in args.set):
        overrides.append("split.val_ratio=0.25")  # a class of ~10 images can't be cut into 10 validation folds
    overrides += args.set
    # what ours will use (params.yaml, then the overrides). The notebook runs at its own 224 px (its
    # wall time is the target's yardstick) unless --image-size sets both.
    size = override_value(overrides, "cnn.image_size", params["cnn"]["image_size"])
    base_size = args.image_size or NOTEBOOK_IMAGE_SIZE
    max_epochs = {m: override_value(overrides, f"{m}.epochs", params[m]["epochs"]) for m in MODELS}
    resamples = override_value(overrides, "evaluate.bootstrap_resamples", params["evaluate"]["bootstrap_resamples"])
    boot_seed = override_value(overrides, "evaluate.seed", params["evaluate"]["seed"])
    epochs_base = {m: args.epochs or baseline.NOTEBOOK[m]["epochs"] for m in MODELS}

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kneexray-compare-") as scratch:
        scratch = Path(scratch)
        source = data
        if args.limit:
            source = scratch / "subset"
            subset_dataset(data, source, args.limit, args.seed)

        print(f"== ours: dvc exp run on {source} ==", file=sys.stderr, flush=True)
        ours, repo = run_ours(source, scratch, overrides, env)
        index = pd.read_csv(repo / "data/extracted/index.csv")
        splits = {name: pd.read_csv(repo / f"data/split/{name}.csv") for name in ("train", "val", "test")}
        test_rows = splits["test"]
        from kneexray.model.inputs import label_indices  # imports TensorFlow (in this process only, not measured)

        y_test = label_indices(test_rows["label"], DEFAULT_CLASSES)
        proba_ours = {}
        for m in MODELS:
            pred = pd.read_csv(repo / f"reports/eval/{m}/predictions.csv")
            if pred["path"].tolist() != test_rows["path"].tolist():
                sys.exit(f"error: reports/eval/{m}/predictions.csv is not in test.csv's order")
            proba_ours[m] = pred[[f"p_{c}" for c in DEFAULT_CLASSES]].to_numpy()
            ours["models"][m]["max_epochs"] = max_epochs[m]
            ours["models"][m]["metrics"] = baseline.our_metrics(
                y_test, proba_ours[m], resamples=resamples, seed=boot_seed
            )

        # the baseline: our train + val images, our test images, as the original files
        train_items = original_files(pd.concat([splits["train"], splits["val"]]), index, data)
        test_items = original_files(test_rows, index, data)
        for name, items in (("train", train_items), ("test", test_items)):
            pd.DataFrame({"path": [str(p) for p, _ in items], "label": [lab for _, lab in items]}).to_csv(
                scratch / f"baseline_{name}.csv", index=False
            )
        cmd = [
            sys.executable,
            "-m",
            "bench.baseline_notebook",
            "--train-list",
            str(scratch / "baseline_train.csv"),
            "--test-list",
            str(scratch / "baseline_test.csv"),
            "--out",
            str(scratch / "baseline.json"),
            "--image-size",
            str(base_size),
            "--epochs-cnn",
            str(epochs_base["cnn"]),
            "--epochs-resnet",
            str(epochs_base["resnet"]),
            "--seed",
            str(args.seed),
            "--resamples",
            str(resamples),
            "--bootstrap-seed",
            str(boot_seed),
        ]
        print("== baseline: the notebook's method on the same images ==", file=sys.stderr, flush=True)
        run, _ = measure(cmd, cwd=ROOT, env=env, label="baseline")
        if run.get("returncode") != 0:
            sys.exit("error: the baseline failed; its output is above")
        result = json.loads((scratch / "baseline.json").read_text())
    load_after = os.getloadavg()

    if [lab for _, lab in test_items] != [t["label"] for t in result["test"]]:
        sys.exit("error: the baseline's test list does not match ours")
    proba_base = {m: r.pop("probabilities") for m, r in result["models"].items()}
    for r in result["models"].values():
        r.pop("history", None)
    base = {
        "command": " ".join(cmd).replace(str(scratch), "<scratch>"),
        "run": run,
        "copy_s": result["copy_s"],
        "models": result["models"],
        "n_train": len(train_items),
    }
    summary = {
        "settings": {
            "data": str(data),
            "limit": args.limit,
            "epochs_override": args.epochs,
            "image_size": size,
            "baseline_image_size": base_size,
            "overrides": overrides,
            "seed": args.seed,
            "bootstrap_resamples": resamples,
            "bootstrap_seed": boot_seed,
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "loadavg_before": load_before,
                "loadavg_after": load_after,
            },
        },
        "test_set": {
            "n_test": len(test_rows),
            "per_class": {c: int((test_rows["label"] == c).sum()) for c in DEFAULT_CLASSES},
            "paths": test_rows["path"].tolist(),
        },
        "train_set": {
            "ours_train": len(splits["train"]),
            "ours_val": len(splits["val"]),
            "baseline_train_and_val": len(train_items),
        },
        "ours": ours,
        "baseline": base,
    }
    summary["comparison"] = compare(ours, base, y_test, proba_ours, proba_base, resamples=resamples, seed=boot_seed)
    summary["table"] = format_table(summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(summary["table"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
