"""`make quickstart`: M1 on MNIST with 100 labels, end to end on the CPU, through the `ssvae` command line.

1. ssvae fit  -c configs/mnist/m1_vae.yaml        -c configs/presets/quick.yaml      (the VAE, all images)
2. ssvae fit  -c configs/mnist/m1_classifier.yaml -c configs/presets/quick.yaml      (frozen encoder + classifier)
3. ssvae test -c configs/mnist/m1_classifier.yaml --ckpt_path <stage 2>/checkpoints/last.ckpt

Every stage logs under lightning_logs/<model>/<version>; the version is quickstart-<date>-<time>, so a rerun never
mixes with an earlier one. Extra arguments go to both fit stages, e.g. `--data.seed 1`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssvae_pl.results import read_scalars  # noqa: E402

LOGS = ROOT / "lightning_logs"


def ssvae(stage: str, *args: str) -> None:
    """Run one `ssvae` command; stop with its exit code if it fails."""
    command = [sys.executable, "-m", "ssvae_pl.cli", *args]
    print(f"\n=== {stage}: ssvae {' '.join(args)}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT)
    if result.returncode:
        print(f"quickstart: {stage} failed (exit {result.returncode}); see the messages above.", file=sys.stderr)
        sys.exit(result.returncode)
    print(f"=== {stage} done in {time.perf_counter() - started:.0f} s", flush=True)


def main(extra: list[str]) -> None:
    version = time.strftime("quickstart-%Y%m%d-%H%M%S")
    quiet = ["--trainer.enable_progress_bar", "false"]
    ssvae("VAE", "fit", "-c", "configs/mnist/m1_vae.yaml", "-c", "configs/presets/quick.yaml",
          "--trainer.logger.init_args.version", version, *quiet, *extra)
    vae_ckpt = LOGS / "m1_vae" / version / "checkpoints" / "last.ckpt"
    ssvae("classifier", "fit", "-c", "configs/mnist/m1_classifier.yaml", "-c", "configs/presets/quick.yaml",
          "--model.init_args.vae_checkpoint", str(vae_ckpt), "--trainer.logger.init_args.version", version,
          *quiet, *extra)
    clf_ckpt = LOGS / "m1_classifier" / version / "checkpoints" / "last.ckpt"
    ssvae("test", "test", "-c", "configs/mnist/m1_classifier.yaml", "--ckpt_path", str(clf_ckpt), *quiet, *extra)
    accuracy = read_scalars(LOGS / "m1_classifier" / version)["test/acc"]  # the test logs beside its checkpoint
    print(f"\nMNIST test accuracy with 100 labels: {accuracy:.4f}")
    print(f"TensorBoard: {Path(sys.executable).parent / 'tensorboard'} --logdir {LOGS.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
