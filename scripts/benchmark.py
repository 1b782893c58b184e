"""Training throughput of the VAE (M1), M2, M1+M2, ADGM and SDGM at the paper's sizes, through Lightning and beside the
loop a user would otherwise write, measured in the same run.

For each model it times, after warm-up steps, the same model, batch and optimiser several ways:

    lightning   Trainer.fit on SemiSupervisedDataModule: the product's path (index-gathered uint8 batches, floats and
                binarisation on the device, the images held on the GPU there, metrics logged every step)
    reference   a hand-written loop: the same module's loss on batches indexed from in-memory tensors, fused Adam
                (as the configs; ``lightning`` uses the same optimiser)
    naive       (M2 only) the reference loop with the sum over classes done the naive way: the whole bound evaluated
                once per class (the encoder's first layer re-reads the pixels K times)
    compiled    Trainer.fit with ``model.compile: true``: the training loss through torch.compile (inductor); its
                compilation happens in the warm-up steps
    graphed     (GPU only) Trainer.fit with ``model.compile: reduce-overhead``: compiled and captured in CUDA graphs,
                each step's forward and backward passes replayed as one launch each
    guarded     (GPU only) ``graphed`` with ``ssvae fit``'s NonFiniteGuard as it runs on a GPU: each step's verdict
                read at the next step, from a copy that travelled without blocking
    synced      (GPU only) ``graphed`` with the NonFiniteGuard reading each step's verdict at once (``deferred:
                false``): the host waits for the device at every step
    uncached    (M1+M2 only) Trainer.fit with ``m1_cache: off``: M1's frozen encoder runs on every batch, where
                ``lightning`` and ``reference`` draw z1 from q(z1|x) cached once (M1+M2's fast path)
    fit         ``ssvae fit`` of the shipped config (configs/mnist/m1_vae.yaml, m2.yaml, m1m2.yaml) for three
                epochs, as a user runs it: validation, checkpoints and every callback; the second epoch's time,
                validation included (``epoch s``; ``of it validation``: the validation with its callbacks, then
                the checkpoints; the pictures, drawn every 10 epochs and at the end, fall in no such epoch), and its
                training loop (``ms/step``);
                with ``--fit-repeats N``, the fit of median ``x limit`` among N, each beside a peak measured just
                before it (the table lists them all)

With ``--repeats N`` each way is timed N times, the ways in turn, and its row is the median. It prints images per
second (labelled and unlabelled), milliseconds per step, the seconds one epoch over the 50,000 training images would
take, and the achieved GFLOP/s (FLOPs of one step counted by torch.utils.flop_counter) beside
the measured peak of a large matrix product on the same device and precision. The limit of an epoch is its training
FLOPs over that peak (``limit s``), and ``x limit`` how many times the limit an epoch takes. The table is also
written as JSON, and ``--docs`` renders it into a marked section of a Markdown file (docs/results.md).

``--breakdown`` (CPU) also profiles the plain loop's step, eager and compiled: the time in matrix products (which do
every FLOP counted) against the rest (activations, the Bernoulli terms, the optimiser), and the products' own
GFLOP/s: how far from the limit the products alone would leave a step.

    python scripts/benchmark.py                                  # CPU, fp32, both models
    python scripts/benchmark.py --precision bf16-mixed           # autocast to bfloat16
    python scripts/benchmark.py --device cuda --steps 200        # a GPU
    python scripts/benchmark.py --models m2 --batch-size 500 --json lightning_logs/benchmark/m2-b500.json
    python scripts/benchmark.py --models m1m2 --vae-checkpoint lightning_logs/m1_vae/version_0/checkpoints/last.ckpt \
        --precision bf16-mixed
    python scripts/benchmark.py --models vae m2 --fit --precision bf16-mixed --docs docs/results.md
    python scripts/benchmark.py --models vae m2 --tiny --steps 200        # framework work per step
    python scripts/benchmark.py --models m2 --ways compiled --breakdown --precision bf16-mixed  # where a step goes
    python scripts/benchmark.py --device cuda --models m2 --ways lightning graphed guarded synced --fit \
        --fit-compile reduce-overhead --precision bf16-mixed --steps 200 --warmup 30  # a GPU's CUDA graphs

Data: MNIST under --data-dir (fetched like every run, offline sources included); its content does not change the
speed. Every way binarises as the model's shipped config does (``data.binarize``: the VAE's batches afresh each
step, M2's grey levels as they are), unless ``--data-option binarize=...`` says otherwise. On a machine shared
with other work the numbers move: run it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssvae_pl.callbacks import NonFiniteGuard  # noqa: E402
from ssvae_pl.data.datamodule import SemiSupervisedDataModule, to_model_input  # noqa: E402
from ssvae_pl.models import ADGM, M1M2, M2, SDGM, VAE  # noqa: E402
from ssvae_pl.files import atomic_output  # noqa: E402
from ssvae_pl.host import NVML_CHECK  # noqa: E402
from ssvae_pl.precision import describe_machine  # noqa: E402
from ssvae_pl.results import read_series, replace_marked_section  # noqa: E402

CONFIGS = {"vae": "configs/mnist/m1_vae.yaml", "m2": "configs/mnist/m2.yaml", "m1m2": "configs/mnist/m1m2.yaml",
           "adgm": "configs/mnist/adgm.yaml", "sdgm": "configs/mnist/sdgm.yaml"}
BATCHES = {"vae": (500, 0), "m2": (200, 100), "m1m2": (200, 20), "adgm": (100, 100), "sdgm": (100, 100)}  # the configs'
EXTRA_WAYS = {"m2": ["naive"], "m1m2": ["uncached"]}  # beside reference, lightning, compiled (and the GPU's)
REPO = Path(__file__).resolve().parents[1]
GPU_WAYS = ("graphed", "guarded", "synced")  # Lightning with CUDA graphs: alone, with the deferred or synced guard
PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def matmul_peak(device: torch.device, precision: str, n: int) -> float:
    """GFLOP/s of an n x n x n matrix product in the precision's compute type (fp32, or bf16/fp16 under autocast)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    with autocast(device, precision):
        for _ in range(2):
            a @ b
        sync(device)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < 1.0 or reps < 3:
            a @ b
            reps += 1
        sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


# ---- the models, their batches and their losses ------------------------------------------------------------------

def make_model(name: str, num_train: int, vae_checkpoint: str | None = None, way: str = "",
               tiny: bool = False) -> pl.LightningModule:
    """The configs' model, or with ``tiny`` the same model one unit wide everywhere (hidden layers and z), whose step
    is almost all framework and launch overhead: the proxy of host work per step."""
    compile = True if way == "compiled" else "reduce-overhead" if way in GPU_WAYS else False  # model.compile
    sizes = {"hidden_dims": [1], "latent_dim": 1} if tiny else {}
    if name == "vae":
        return VAE(compile=compile, **sizes)  # the paper's M1: 784-600-600-50
    if tiny:
        sizes["classifier_hidden_dims"] = [1]
    if name == "m1m2":  # configs/mnist/m1m2.yaml's model; "uncached" runs M1's encoder at every step
        return M1M2(vae_checkpoint=vae_checkpoint, alpha_per_label=2, m1_cache="off" if way == "uncached" else "grey",
                    compile=compile, **{"hidden_dims": [300], "classifier_hidden_dims": [300], "latent_dim": 10,
                                        **sizes})
    if name in ("adgm", "sdgm"):  # the configs' model: two layers of 500, a and z of 100
        sizes = {"hidden_dims": [1, 1], "aux_dim": 1, "latent_dim": 1} if tiny else {}
        return {"adgm": ADGM, "sdgm": SDGM}[name](**{**model_settings(name), "compile": compile}, **sizes)
    return M2(alpha=float(num_train), weighting="batch", compile=compile, **sizes)  # m2.yaml: 500 units, z 50


def model_settings(name: str) -> dict:
    """``model.init_args`` of the model's shipped config (its networks and objective), or none."""
    model = yaml.safe_load((REPO / CONFIGS[name]).read_text()).get("model") or {}
    return dict(model.get("init_args") or {})


def training_loss(model: pl.LightningModule, batch: dict, naive: bool = False, compiled: bool = False) -> torch.Tensor:
    """The loss of a training step; ``compiled``: through the model's ``model.compile`` path, as Lightning steps."""
    if isinstance(model, VAE):
        return -(model._training_terms if compiled else model)(batch["unlabelled"])["elbo"].mean()
    if not naive:
        return (model._training_loss if compiled else model.loss_terms)(batch)["loss"]
    # the naive enumeration: L(x, y) evaluated once per class, each a full pass of the encoder and the decoder
    x_l, y_l = batch["labelled"]
    x_u = batch["unlabelled"]
    k = model.hparams.num_classes
    bounds = torch.stack([model.labelled_bound(x_u, torch.full((len(x_u),), c, device=x_u.device))
                          for c in range(k)], dim=1)  # (B, K)
    logits = model.classifier(x_u)
    from ssvae_pl import elbo

    bound_u = elbo.unlabelled_bound(logits.float().softmax(-1), bounds)
    bound_l = model.labelled_bound(x_l, y_l)
    classification = torch.nn.functional.cross_entropy(model.classifier(x_l).float(), y_l)
    w_l, w_u, w_c = model.objective_weights(len(y_l), len(x_u))
    return w_l * -bound_l.mean() + w_u * -bound_u.mean() + w_c * classification


class Batches:
    """Random training batches indexed from the data module's uint8 tensors, made ready on ``device`` as the data
    module makes them (binarised afresh where its ``binarize`` is ``dynamic``); for M1+M2's fast path, from the
    cached posterior rows of M1 (``model.posterior_rows``) instead."""

    def __init__(self, dm: SemiSupervisedDataModule, device: torch.device, labelled_batch: int, batch: int,
                 model: pl.LightningModule | None = None) -> None:
        unlabelled, labelled = dm.unlabelled_dataset(), dm.labelled_dataset()
        self.u = unlabelled.images.to(device)
        self.l_images, self.l_labels = labelled.images.to(device), labelled.labels.to(device)
        if model is not None:  # the cache, as M1M2.on_fit_start builds it
            generator = torch.Generator(device).manual_seed(0)
            self.u, self.l_images = (torch.cat([model.posterior_rows(to_model_input(chunk), generator)
                                                for chunk in t.split(1000)]) for t in (self.u, self.l_images))
        self.batch, self.labelled_batch, self.device = batch, labelled_batch, device
        self.dynamic = dm.hparams.binarize == "dynamic"

    def __call__(self) -> dict:
        iu = torch.randint(len(self.u), (self.batch,), device=self.device)
        il = torch.randint(len(self.l_images), (self.labelled_batch,), device=self.device)
        raw = {"labelled": (self.l_images[il], self.l_labels[il]), "unlabelled": self.u[iu]}
        return to_model_input(raw, dynamic=self.dynamic)


def step_flops(model: pl.LightningModule, batch: dict, naive: bool = False) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        training_loss(model, batch, naive).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@contextlib.contextmanager
def without_lightning_environment():
    """The environment of a script that never imports Lightning: without the ``PYTORCH_NVML_BASED_CUDA_CHECK=1``
    that Lightning's import sets (``ssvae_pl.host``), which a plain loop would not pay for at every Adam step."""
    saved = os.environ.pop(NVML_CHECK, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[NVML_CHECK] = saved


@without_lightning_environment()
def time_reference(model, batches: Batches, device, precision, warmup: int, steps: int, naive: bool = False,
                   compiled: bool = False, profiler=None) -> float:
    """Seconds per step of the hand-written loop, as a script without Lightning runs it; with a
    ``torch.profiler.profile``, its timed steps profiled."""
    model.to(device).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            if profiler is not None:
                profiler.start()
            start = time.perf_counter()
        batch = batches()
        with autocast(device, precision):
            loss = training_loss(model, batch, naive, compiled)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    if profiler is not None:
        profiler.stop()
    return seconds


MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")


def breakdown(name: str, args, dm: SemiSupervisedDataModule, batches: Batches, device: torch.device, peak: float,
              flops: int) -> list[dict]:
    """Where a step of the plain loop goes on the CPU, eager and through ``model.compile: true``, under
    torch.profiler: the matrix products (every FLOP the counter counts) against everything else (the element-wise
    work: activations, the Bernoulli terms, the optimiser). The products alone at the measured peak are the limit."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for loop in ("eager", "compiled"):
        model = make_model(name, dm.num_train, args.vae_checkpoint, "compiled" if loop == "compiled" else "",
                           tiny=args.tiny)
        if name != "vae":
            model.set_data_sizes(dm.hparams.num_labelled, dm.num_unlabelled, dm.num_train)
        profiler = profile(activities=[ProfilerActivity.CPU])
        seconds = time_reference(model, batches, device, args.precision, args.warmup, args.steps,
                                 compiled=loop == "compiled", profiler=profiler)
        products = sum(e.self_cpu_time_total for e in profiler.key_averages() if e.key in MATRIX_PRODUCTS) / 1e6
        products /= args.steps
        limit = flops / peak / 1e9
        rows.append({"model": name, "loop": loop, "ms_per_step": 1e3 * seconds, "products_ms": 1e3 * products,
                     "products_gflop_per_s": flops / products / 1e9, "rest_ms": 1e3 * (seconds - products),
                     "limit_ms": 1e3 * limit, "vs_limit": seconds / limit, "products_vs_limit": products / limit})
    return rows


class _StepClock(pl.Callback):
    """Time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            sync(pl_module.device)
            self.end, self.steps = time.perf_counter(), self.steps + 1


def time_lightning(model, dm, device, precision, warmup: int, steps: int, callbacks=()) -> float:
    """Seconds per step of Trainer.fit, as ``ssvae fit`` runs it (logging every step, no checkpoints)."""
    model.configure_optimizers = lambda: torch.optim.Adam(  # the reference's optimiser, not the config's
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    clock = _StepClock(warmup)
    trainer = pl.Trainer(accelerator=device.type, devices=1, precision=precision, max_epochs=1,
                         limit_train_batches=warmup + steps, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[clock, *callbacks])
    trainer.fit(model, datamodule=dm)
    return (clock.end - clock.start) / clock.steps


def time_fit(name: str, args, device: torch.device) -> dict[str, float]:
    """``ssvae fit`` of the shipped config for three epochs in a fresh process, as a user runs it; of its second
    epoch, in seconds: ``train_epoch_s``, the training loop (``time/epoch_seconds``); ``epoch_s``, the whole epoch
    with its validation and checkpoints (between the first two epochs' ``time/elapsed_seconds``); ``validation_s``,
    the validation with its callbacks (``time/validation_seconds``). The first epoch holds the warm-up (and
    compilation), the last one the pictures that every run draws once at its end."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "ssvae_pl.cli", "fit", "-c", CONFIGS[name], "--trainer.max_epochs", "3",
                   "--trainer.precision", args.precision, "--data.data_dir", args.data_dir,
                   "--trainer.logger.init_args.save_dir", folder, "--trainer.enable_progress_bar", "false"]
        if name == "m1m2":
            command += ["--model.init_args.vae_checkpoint", args.vae_checkpoint]
        if args.fit_compile:
            command += ["--model.init_args.compile", args.fit_compile]
        for key, value in args.data_options.items():
            command += [f"--data.{key}", json.dumps(value)]
        if device.type == "cuda":
            command += ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"benchmark: `{' '.join(command)}` failed:\n{done.stderr[-2000:]}")
        (run,) = Path(folder).glob("*/version_0")
        training, elapsed = read_series(run, "time/epoch_seconds"), read_series(run, "time/elapsed_seconds")
        validation = read_series(run, "time/validation_seconds")
    return {"train_epoch_s": training[1], "epoch_s": elapsed[1] - elapsed[0], "validation_s": validation[1]}


def median_fit(fits: list[dict]) -> dict:
    """The fit whose ratio to its own limit is the median (the lower one of an even count)."""
    return sorted(fits, key=lambda f: f["vs_limit"])[(len(fits) - 1) // 2]


def config_binarize(name: str) -> str:
    """``data.binarize`` of the model's shipped config, or the data module's default where it names none."""
    data = yaml.safe_load((REPO / CONFIGS[name]).read_text()).get("data") or {}
    return data.get("binarize", inspect.signature(SemiSupervisedDataModule).parameters["binarize"].default)


def benchmark(name: str, args, dm: SemiSupervisedDataModule, device: torch.device,
              peak: float) -> tuple[list[dict], list[dict]]:
    """The table's rows of one model, and ``--breakdown``'s (empty without it)."""
    torch.manual_seed(0)
    labelled_batch = 0 if name == "vae" else args.labelled_batch_size or BATCHES[name][1]
    batch = args.batch_size or BATCHES[name][0]
    dm.hparams.batch_size, dm.hparams.labelled_batch_size = batch, max(labelled_batch, 1)
    dm.hparams.binarize = args.data_options.get("binarize", config_binarize(name))  # every way's, as the fit's
    batches = Batches(dm, device, max(labelled_batch, 1), batch)
    images, steps = batch + labelled_batch, dm.num_train / batch  # images a step, steps an epoch
    rows = []
    gpu_ways = GPU_WAYS if device.type == "cuda" else ()
    ways = ["reference", "lightning", "compiled", *gpu_ways, *EXTRA_WAYS.get(name, [])]
    ways = [way for way in ways if way == "reference" or not args.ways or way in args.ways]  # reference: the ratios'
    prepared = []  # (way, model, its batches, FLOPs of a step)
    for way in ways:
        model = make_model(name, dm.num_train, args.vae_checkpoint, way, tiny=args.tiny)
        if name != "vae":
            model.set_data_sizes(dm.hparams.num_labelled, dm.num_unlabelled, dm.num_train)
        model.to(device)
        if name == "m1m2" and way == "reference":  # M1's posterior cached once, as the fast path does
            cached = Batches(dm, device, labelled_batch, batch, model)
        way_batches = cached if name == "m1m2" and way != "uncached" else batches
        prepared.append((way, model, way_batches, step_flops(model, way_batches(), naive=way == "naive")))
    timings = {way: [] for way in ways}
    for _ in range(args.repeats):  # the ways in turn, so that the machine's drift falls on all of them alike
        for way, model, way_batches, _ in prepared:
            if way not in ("reference", "naive"):  # through Trainer.fit
                guard = {"guarded": [NonFiniteGuard()], "synced": [NonFiniteGuard(deferred=False)]}.get(way, [])
                seconds = time_lightning(model, dm, device, args.precision, args.warmup, args.steps, guard)
            else:
                seconds = time_reference(model, way_batches, device, args.precision, args.warmup, args.steps,
                                         naive=way == "naive")
            timings[way].append(seconds)
    for way, _, _, flops in prepared:
        seconds = statistics.median(timings[way])
        rows.append({
            "model": name, "way": way, "device": str(device), "precision": args.precision,
            "batch": f"{batch}+{labelled_batch}" if labelled_batch else str(batch),
            "images_per_s": images / seconds, "ms_per_step": 1e3 * seconds,
            "epoch_s": steps * seconds, "gflop_per_step": flops / 1e9,
            "gflop_per_s": flops / seconds / 1e9, "peak_gflop_per_s": peak,
        })
    parts = breakdown(name, args, dm, cached if name == "m1m2" else batches, device, peak,
                      round(rows[0]["gflop_per_step"] * 1e9)) if args.breakdown else []

    def limit_epoch_s(at_peak: float) -> float:
        """An epoch's training FLOPs (the reference's step, counted) over a peak in GFLOP/s."""
        return steps * rows[0]["gflop_per_step"] / at_peak

    if args.fit:
        fits = []
        for _ in range(args.fit_repeats):  # each beside a peak of its own: the machine's speed drifts between fits
            fit_peak = matmul_peak(device, args.precision, args.peak_size) if args.fit_repeats > 1 else peak
            fit = time_fit(name, args, device)
            fits.append({**fit, "peak_gflop_per_s": fit_peak, "vs_limit": fit["epoch_s"] / limit_epoch_s(fit_peak)})
        fit = median_fit(fits)
        rows.append({**rows[0], "way": "fit", "images_per_s": images * steps / fit["epoch_s"],
                     "ms_per_step": 1e3 * fit["train_epoch_s"] / steps, "epoch_s": fit["epoch_s"],
                     "train_epoch_s": fit["train_epoch_s"], "validation_s": fit["validation_s"],
                     "gflop_per_s": rows[0]["gflop_per_step"] * steps / fit["epoch_s"],
                     "peak_gflop_per_s": fit["peak_gflop_per_s"], **({"fits": fits} if len(fits) > 1 else {})})
    reference = rows[0]["images_per_s"]
    for row in rows:
        row["vs_reference"] = row["images_per_s"] / reference
        row["limit_epoch_s"] = limit_epoch_s(row["peak_gflop_per_s"])
        row["vs_limit"] = row["epoch_s"] / row["limit_epoch_s"]
    if name == "m2" and any(row["way"] == "naive" for row in rows):
        naive = next(row for row in rows if row["way"] == "naive")["images_per_s"]
        for row in rows:
            row["vs_naive"] = row["images_per_s"] / naive
    return rows, parts


def fit_shares(row: dict) -> str:
    """A fit's epoch beyond its training loop, seconds and share: its validation with the callbacks, then the rest
    (the checkpoints); records without ``validation_s`` hold the two together."""
    def share(seconds: float) -> str:
        return f"{seconds:.1f} s ({100 * seconds / row['epoch_s']:.0f}%)"

    beyond = row["epoch_s"] - row["train_epoch_s"]
    if "validation_s" not in row:
        return share(beyond)
    return f"{share(row['validation_s'])}; checkpoints {share(beyond - row['validation_s'])}"


def table_lines(rows: list[dict]) -> list[str]:
    """The table as Markdown: one row per model and way."""
    lines = ["| model | way | batch | images/s | ms/step | epoch s | of it validation | GFLOP/s | peak | limit s "
             "| x limit | x ref | x naive |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        naive = f"{r['vs_naive']:.2f}" if "vs_naive" in r else ""
        validation = fit_shares(r) if "train_epoch_s" in r else ""
        lines.append(f"| {r['model']} | {r['way']} | {r['batch']} | {r['images_per_s']:.0f} | {r['ms_per_step']:.1f} | "
                     f"{r['epoch_s']:.1f} | {validation} | {r['gflop_per_s']:.1f} | {r['peak_gflop_per_s']:.0f} | "
                     f"{r['limit_epoch_s']:.1f} | {r['vs_limit']:.2f} | {r['vs_reference']:.2f} | {naive} |")
    for r in rows:
        if "fits" in r:
            each = ", ".join(f"{f['epoch_s']:.2f} s at {f['peak_gflop_per_s']:.0f} ({f['vs_limit']:.2f})"
                             for f in sorted(r["fits"], key=lambda f: f["vs_limit"]))
            lines += ["", f"{r['model']} `fit`, the median of {len(r['fits'])} fits, each beside its own peak "
                          f"(epoch, peak GFLOP/s, x limit): {each}."]
    return lines


def breakdown_lines(parts: list[dict]) -> list[str]:
    """``--breakdown``'s table: a plain-loop step's matrix products against the rest, eager and compiled."""
    lines = ["| model | loop | ms/step | matrix products ms | their GFLOP/s | the rest ms | limit ms | x limit "
             "| products alone, x limit |", "|---|---|---|---|---|---|---|---|---|"]
    for r in parts:
        lines.append(f"| {r['model']} | {r['loop']} | {r['ms_per_step']:.1f} | {r['products_ms']:.1f} | "
                     f"{r['products_gflop_per_s']:.1f} | {r['rest_ms']:.1f} | {r['limit_ms']:.1f} | "
                     f"{r['vs_limit']:.2f} | {r['products_vs_limit']:.2f} |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(CONFIGS), default=["vae", "m2"])
    parser.add_argument("--vae-checkpoint", default=None, help="M1's checkpoint for m1m2 (its active dimensions "
                        "set M2's size), e.g. lightning_logs/m1_vae/version_0/checkpoints/last.ckpt")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="32-true")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="unlabelled images per step (default: the configs', 500 for the VAE, 200 for M2)")
    parser.add_argument("--labelled-batch-size", type=int, default=None,
                        help="labelled images per step (default: the configs', 100 for m2 and 20 for m1m2)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per way (default: 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--peak-size", type=int, default=None, help="n of the n^3 peak product (default: 2048 "
                        "on a CPU, 8192 on a GPU)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                        help="another data setting (a YAML value), for the data module and the fits, e.g. "
                             "val_size=100; repeatable")
    parser.add_argument("--tiny", action="store_true", help="models one unit wide (hidden layers and z): the step "
                        "is then the framework's own work, and lightning minus reference its cost per step")
    parser.add_argument("--fit", action="store_true", help="also time a full `ssvae fit` epoch of each model's "
                        "shipped config (the `fit` way; with --batch-size, only the other ways take it)")
    parser.add_argument("--repeats", type=int, default=1, metavar="N", help="time every way N times, the ways in "
                        "turn, and report each way's median (default: 1)")
    parser.add_argument("--fit-repeats", type=int, default=1, metavar="N", help="with --fit: N fits of each model, "
                        "each beside a matmul peak measured just before it; the row is the fit of median x limit "
                        "(default: 1, beside the run's one peak)")
    parser.add_argument("--ways", nargs="+", default=None, help="time only these ways beside the reference "
                        "(default: every way the device has; graphed, guarded and synced only on a GPU)",
                        choices=["lightning", "compiled", "graphed", "guarded", "synced", "naive", "uncached"])
    parser.add_argument("--breakdown", action="store_true", help="also profile the plain loop's step, eager and "
                        "compiled (CPU): time in matrix products against the rest")
    parser.add_argument("--fit-compile", default=None, metavar="MODE", help="the `fit` way with --model.compile "
                        "MODE, e.g. reduce-overhead (CUDA graphs on a GPU)")
    parser.add_argument("--json", default="lightning_logs/benchmark/benchmark.json", help="where the table goes")
    parser.add_argument("--docs", default=None, metavar="MARKDOWN", help="render the table, the command and the "
                        "machine into MARKDOWN between <!-- benchmark PRECISION DEVICE --> markers")
    parser.add_argument("--section", default="", metavar="NAME", help="with --docs: a section of its own, between "
                        "<!-- benchmark PRECISION DEVICE NAME --> markers (another setting beside the main table)")
    parser.add_argument("--render", default=None, metavar="JSON", help="render a measured table (its JSON, written "
                        "by an earlier run, e.g. on another machine) into --docs instead of measuring")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.render:
        if not args.docs:
            parser.error("--render needs --docs MARKDOWN")
        render(json.loads(Path(args.render).read_text()), Path(args.docs))
        print(f"rendered {args.render} into {args.docs}")
        return
    try:
        args.data_options = {key: yaml.safe_load(value) for key, _, value in
                             (option.partition("=") for option in args.data_option) if key and _}
    except yaml.YAMLError as error:
        parser.error(f"--data-option: {error}")
    if len(args.data_options) != len(args.data_option):
        parser.error("--data-option takes KEY=VALUE, e.g. val_size=100")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible here; use --device cpu")
    if args.precision == "16-mixed" and device.type != "cuda":
        parser.error("--precision 16-mixed needs a GPU; on a CPU use bf16-mixed or 32-true")
    if "m1m2" in args.models and not args.vae_checkpoint:
        parser.error("--models m1m2 needs --vae-checkpoint <M1's checkpoint>")
    if min(args.steps, args.labelled_batch_size or 1) <= 0 or args.warmup < 0:
        parser.error("--steps and --labelled-batch-size must be positive, --warmup >= 0")
    if args.breakdown and device.type != "cpu":
        parser.error("--breakdown reads the CPU's time of each operator; on a GPU use the torch.profiler trace")
    if min(args.repeats, args.fit_repeats) < 1:
        parser.error("--repeats and --fit-repeats must be at least 1")
    if args.tiny and args.fit:
        parser.error("--tiny times the hand-built models; --fit runs the shipped configs: choose one")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    dm = SemiSupervisedDataModule(dataset="mnist", data_dir=args.data_dir, num_labelled=100,
                                  **args.data_options)
    dm.prepare_data()
    dm.setup("fit")
    args.peak_size = args.peak_size or (8192 if device.type == "cuda" else 2048)
    peak = matmul_peak(device, args.precision, args.peak_size)
    machine = describe_machine()
    setting = (f"device {device} ({machine}; {torch.get_num_threads()} threads), precision {args.precision}, torch "
               f"{torch.__version__}, pytorch-lightning {pl.__version__}; matmul peak {peak:.1f} GFLOP/s")
    print(setting + "\n")
    rows, parts = [], []
    for name in args.models:
        model_rows, model_parts = benchmark(name, args, dm, device, peak)
        rows, parts = rows + model_rows, parts + model_parts
    print("\n".join(table_lines(rows) + (["", *breakdown_lines(parts)] if parts else [])))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"argv": ["scripts/benchmark.py", *(argv if argv is not None else sys.argv[1:])], "machine": machine,
              "setting": setting, "rows": rows, **({"breakdown": parts} if parts else {})}
    with atomic_output(out, overwrite=True) as temporary:
        temporary.write_text(json.dumps(record, indent=1))
    print(f"\nwritten: {out}")
    if args.docs:
        render(record, Path(args.docs))
        print(f"rendered into {args.docs}")


def render(record: dict, docs: Path) -> None:
    """A measured table (the JSON record) with its command and machine, between ``<!-- benchmark PRECISION DEVICE
    [tiny] [SECTION] -->`` markers in ``docs``; the command without ``--json`` and ``--docs``, which say where it wrote."""
    shown, skip = [], False
    for arg in record["argv"][1:]:
        if skip or arg in ("--json", "--docs"):
            skip = not skip
            continue
        shown.append(arg)
    command = "python scripts/benchmark.py " + " ".join(shown)
    args = build_parser().parse_args(shown)
    key = " ".join(filter(None, ["benchmark", args.precision, torch.device(args.device).type, "tiny" * args.tiny,
                                 args.section]))
    parts = ["", *breakdown_lines(record["breakdown"])] if record.get("breakdown") else []
    replace_marked_section(docs, key, "\n".join([f"`{command}`", "", f"Machine: {record['setting']}.", "",
                                                 *table_lines(record["rows"]), *parts]))


if __name__ == "__main__":
    main()
