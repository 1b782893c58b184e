"""``ssvae export --ckpt_path <ckpt> [--output_dir DIR]``: a trained classifier as TorchScript and ONNX, for use
without this package or Lightning. Exported is the classifier ``ssvae predict`` uses: LatentClassifier, M1's frozen
encoder (posterior mean) and head; M2, q(y|x); M1+M2, M1's frozen encoder and q(y|x). Input ``images``: float32
(B, C, H, W) in [0, 1], binarised or grey as in training (MNIST: (B, 1, 28, 28), light digit on black); output
``probabilities`` (B, K), softmax applied; B is free. Writes ``<stem>.torchscript.pt``, ``<stem>.onnx`` and
``<stem>.json`` (class names in output order, input shape, ``ssvae predict``'s ``preprocessing``, as in
``data/preprocess.py``) into ``--output_dir`` (default: the checkpoint's folder), <stem> the checkpoint's name. Each
file is first loaded back (``torch.jit.load``; ONNX Runtime) and must give the checkpoint's probabilities within
``--atol`` on seeded batches of 1 and 64 images, else ``ExportError`` and nothing is written. Existing files are
replaced only with ``--overwrite``, in one step (``os.replace``)."""

from __future__ import annotations

import argparse
import inspect
import io
import json
import sys
import warnings
from contextlib import ExitStack
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from ssvae_pl.checkpoint_io import read_checkpoint
from ssvae_pl.data.preprocess import preprocessing_of
from ssvae_pl.errors import CheckpointError, ConfigError, ExportError, OutputError
from ssvae_pl.files import atomic_output, check_writable, write_error
from ssvae_pl.prediction import class_names

TOLERANCE = 1e-4  # largest absolute difference of a probability, exported model against the checkpoint
CHECK_BATCH_SIZES = (1, 64)
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"


class ClassProbabilities(nn.Module):
    """Images (B, C, H, W) in [0, 1] -> class probabilities (B, K): a model's ``image_classifier()`` and softmax."""

    def __init__(self, logits: nn.Module) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).softmax(dim=-1)


def read_classifier_checkpoint(ckpt_path: str) -> dict:
    return read_checkpoint(ckpt_path, "--ckpt_path", "pass a LatentClassifier or M2 checkpoint, e.g. "
                           "lightning_logs/m1_classifier/version_0/checkpoints/last.ckpt")


def load_classifier(ckpt_path: str, ckpt: dict | None = None) -> pl.LightningModule:
    """The LatentClassifier or M2 (M1+M2) of a checkpoint (``ckpt``: the file's contents, when already read), in
    eval mode. Raises ``CheckpointError`` naming the file when it is missing, unreadable, or of a model that does
    not classify (a VAE)."""
    from ssvae_pl.models import ADGM, M1ADGM, M1M2, M2, SDGM, LatentClassifier

    classifiers = {"LatentClassifier": LatentClassifier, "M2": M2, "M1M2": M1M2, "ADGM": ADGM, "SDGM": SDGM,
                   "M1ADGM": M1ADGM}
    ckpt = read_classifier_checkpoint(ckpt_path) if ckpt is None else ckpt
    hparams, state = dict(ckpt.get("hyper_parameters", {})), ckpt["state_dict"]
    name = hparams.get("_class_path", "").rsplit(".", 1)[-1]
    if not name and any(k.startswith("classifier.") for k in state):  # saved by a plain Trainer: by its weights
        name = ("LatentClassifier" if not any(k.startswith("decoder.") for k in state)
                else "M1M2" if any(k.startswith("m1_encoder.") for k in state) else "M2")
    if name not in classifiers:
        raise CheckpointError(f"--ckpt_path: {ckpt_path} holds a {name or 'model that is not a classifier'}, which "
                              f"does not classify; export needs a {', '.join(classifiers)} checkpoint.")
    model_class = classifiers[name]
    accepted = inspect.signature(model_class).parameters
    try:
        model = model_class(**{k: v for k, v in hparams.items() if k in accepted})
        model.load_state_dict(state)
    except (ConfigError, CheckpointError, TypeError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"--ckpt_path: {ckpt_path} does not rebuild into a {name} "
                              f"({type(err).__name__}: {str(err)[:200]}).") from None
    return model.eval()


def check_batches(input_shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    """Seeded images (B, C, H, W) in [0, 1], one batch of each of ``CHECK_BATCH_SIZES``: half binary, half grey."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in CHECK_BATCH_SIZES:
        grey = torch.rand(size, *input_shape, generator=generator)
        binary = torch.bernoulli(grey, generator=generator)
        batches.append(torch.where(torch.arange(size).view(-1, *[1] * len(input_shape)) % 2 == 0, binary, grey))
    return batches


def largest_difference(run_exported, reference: pl.LightningModule, batches: list[torch.Tensor], what: str,
                       atol: float) -> float:
    """The largest |exported - checkpoint| probability over ``batches``; ``ExportError`` when above ``atol``."""
    worst = 0.0
    for x in batches:
        with torch.no_grad():
            expected = reference(x).float().softmax(dim=-1)  # (B, K), as `ssvae predict` computes it
        got = torch.as_tensor(run_exported(x))
        if got.shape != expected.shape:
            raise ExportError(f"the exported {what} model gives shape {tuple(got.shape)} for a batch of {len(x)}, "
                              f"the checkpoint {tuple(expected.shape)}; nothing was written.")
        worst = max(worst, (got - expected).abs().max().item())
    if not worst <= atol:
        raise ExportError(f"the exported {what} model differs from the checkpoint by up to {worst:.3g} in a "
                          f"probability (tolerance {atol:g}); nothing was written.")
    return worst


def torchscript_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    """The traced model as the bytes of a TorchScript file. Serialised in memory, so that the file is written by a
    plain write: a full disk or a read-only folder is an ``OSError`` naming the file, not an abort in C++."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # TorchScript is deprecated in recent torch, yet still what jit.load reads
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, example), buffer)
    return buffer.getvalue()


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu")


def onnx_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    """The model as the bytes of one ONNX file, through torch.export (``dynamo=True``, which needs onnxscript), the
    batch dimension left free, the weights inside; serialised in memory, as ``torchscript_bytes``."""
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), verbose=False)
    return program.model_proto.SerializeToString()


def write_bytes(temporary: Path, target: Path, data: bytes) -> None:
    """``data`` into ``target``'s temporary file; a failed write is one ``OutputError`` naming ``target``."""
    try:
        temporary.write_bytes(data)
    except OSError as err:
        raise write_error(target, err) from err


def export_classifier(ckpt_path: str, output_dir: str | None = None, overwrite: bool = False,
                      atol: float = TOLERANCE) -> dict[str, tuple[Path, float]]:
    """Write the checkpoint's classifier as TorchScript and ONNX, each checked against the checkpoint first.
    Returns, for ``torchscript`` and ``onnx``, the file written and its largest difference in a probability."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("ssvae export needs onnx, onnxscript and onnxruntime: pip install -e '.[export]'") from None
    ckpt = read_classifier_checkpoint(ckpt_path)
    model = load_classifier(ckpt_path, ckpt)
    folder = Path(output_dir) if output_dir is not None else Path(ckpt_path).parent
    stem = Path(ckpt_path).stem
    targets = {"torchscript": folder / f"{stem}.torchscript.pt", "onnx": folder / f"{stem}.onnx",
               "json": folder / f"{stem}.json"}
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--output_dir {folder} is a file; pass a folder (created if need be).")
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:  # all three named at once (atomic_output would name the first)
        raise OutputError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass "
                          "--overwrite to replace them, or --output_dir another folder.")
    check_writable(targets["torchscript"])  # a read-only or missing folder before the work, not after
    exported = ClassProbabilities(model.image_classifier()).eval()
    input_shape = tuple(model.hparams.input_shape)
    example = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(1))  # traced; B stays free
    batches = check_batches(input_shape)
    results = {}
    with ExitStack() as stack:  # the files replace their targets only when both are written and checked
        temporary = {kind: stack.enter_context(atomic_output(path, overwrite)) for kind, path in targets.items()}
        write_bytes(temporary["torchscript"], targets["torchscript"], torchscript_bytes(exported, example))
        scripted = load_torchscript(temporary["torchscript"])
        results["torchscript"] = largest_difference(scripted, model, batches, "TorchScript", atol)

        write_bytes(temporary["onnx"], targets["onnx"], onnx_bytes(exported, example))
        session = onnxruntime.InferenceSession(str(temporary["onnx"]), providers=["CPUExecutionProvider"])
        results["onnx"] = largest_difference(lambda x: session.run(None, {INPUT_NAME: x.numpy()})[0], model,
                                             batches, "ONNX", atol)
        # what the outputs mean and how a file becomes an input, beside them: output k is class_names[k]
        names = class_names(model, None, int(exported(example).shape[-1]))
        preprocessing = preprocessing_of(input_shape, ckpt.get("datamodule_hyper_parameters") or {})
        write_bytes(temporary["json"], targets["json"], (json.dumps({
            "class_names": names, "input_shape": list(input_shape), "input": INPUT_NAME, "output": OUTPUT_NAME,
            "preprocessing": preprocessing.spec()}, indent=2) + "\n").encode())
        results["json"] = None
    return {kind: (targets[kind], difference) for kind, difference in results.items()}


class ExportParser(argparse.ArgumentParser):
    """A wrong option is one ``ssvae: error:`` line, as in the other subcommands, not a usage dump."""

    def error(self, message: str):
        print(f"ssvae: error: {message}; `ssvae export --help` lists every option.", file=sys.stderr)
        sys.exit(2)


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = ExportParser(
        prog="ssvae export",
        description="Write a trained classifier (LatentClassifier, M2 or M1+M2 checkpoint) as TorchScript and ONNX: "
                    "float32 images (B, C, H, W) in [0, 1] -> class probabilities (B, K), any batch size B. Each "
                    "file is checked against the checkpoint before it is put in place.",
    )
    parser.add_argument("--ckpt_path", required=True, help="the classifier's checkpoint, e.g. .../last.ckpt")
    parser.add_argument("--output_dir", default=None,
                        help="where to write <stem>.torchscript.pt and <stem>.onnx (default: the checkpoint's folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace export files that already exist")
    parser.add_argument("--atol", type=non_negative, default=TOLERANCE,
                        help=f"largest difference allowed in a probability (default {TOLERANCE:g})")
    return parser


def main(args: list[str] | None = None) -> None:
    """``ssvae export``; its errors reach the one handler of ``ssvae_pl.cli.main`` (an ``ExportError`` exits 1)."""
    options = build_parser().parse_args(args)
    try:
        written = export_classifier(options.ckpt_path, options.output_dir, options.overwrite, options.atol)
    except ExportError as err:
        print(f"ssvae: error: {err}", file=sys.stderr)
        sys.exit(1)
    sizes = ", ".join(str(b) for b in CHECK_BATCH_SIZES)
    for kind, (path, difference) in written.items():
        if difference is None:
            print(f"wrote {path} (the class names, in the order of the outputs, and how an image file becomes an "
                  "input: the preprocessing of `ssvae predict`)")
            continue
        print(f"wrote {path} ({kind}): matches the checkpoint on batches of {sizes} images, largest difference "
              f"in a probability {difference:.2g} (tolerance {options.atol:g})")


if __name__ == "__main__":
    main()
