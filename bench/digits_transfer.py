"""Does pretraining transfer? A ViT and a ResNet pretrained by bigft on the digits 0-4,
their heads swapped for 5-9, against the same architectures from random initialisation,
trained on 50 images of 5-9 (head only, and full fine-tuning) and scored on the other 846.

    python bench/digits_transfer.py [--seeds 0 1]

Runs configs/examples/digits-vit-pretrain.yaml and digits-vit-transfer.yaml (with
overrides) through `bigft train` in a scratch folder; prints one table row per
(architecture, method, start) with the held-out accuracy of each seed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(work: Path, config: str, *overrides: str) -> dict:
    out = work / "runs" / "bench"
    command = [sys.executable, "-m", "bigft", "train", f"configs/examples/{config}", *overrides]
    command += [f"output_dir={out}", "--overwrite"]
    subprocess.run(command, cwd=work, check=True, capture_output=True)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bigft-transfer-"))
    shutil.copytree(REPO / "configs", work / "configs")
    subprocess.run([sys.executable, "-m", "bigft.digits", "digits"], cwd=work, check=True)
    rows = []
    for arch in ("vit", "resnet"):
        base = work / "digits" / f"{arch}-random"
        scores: dict[tuple[str, str], list[float]] = {}
        for seed in args.seeds:
            summary = train(
                work, "digits-vit-pretrain.yaml", f"model.name_or_path={base}", f"train.seed={seed}"
            )
            pretrained = work / f"pretrained-{arch}"
            shutil.rmtree(pretrained, ignore_errors=True)
            shutil.copytree(work / "runs" / "bench" / "final", pretrained)
            rows.append(
                f"{arch} pretraining, seed {seed}: validation accuracy "
                f"{summary['validation']['eval_accuracy']:.3f}"
            )
            for method, extra in (
                ("head", []),
                ("full", ["method.name=full", "method.train_top_layers=null", "optim.lr=1e-3"]),
            ):
                for start, model in (("pretrained", pretrained), ("random", base)):
                    summary = train(
                        work,
                        "digits-vit-transfer.yaml",
                        f"model.name_or_path={model}",
                        f"train.seed={seed}",
                        *extra,
                    )
                    accuracy = summary["test"]["eval_accuracy"]
                    scores.setdefault((method, start), []).append(accuracy)
        for (method, start), values in scores.items():
            shown = ", ".join(f"{v:.3f}" for v in values)
            rows.append(f"| {arch} | {method} | {start} | {shown} |")
    print("\n".join(rows))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
