"""The options of ``compare`` (two models, no rewrite), declared once: the CLI command's
parameters and ``ms.compare``'s keywords for files come from here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import Options, finite_non_negative, option
from .run import INPUT, OUTPUT, VERIFICATION, _seed, shapes

_FILES = ".pt/.pth/.ckpt, .safetensors, .onnx, darknet .weights or Caffe .caffemodel"


@dataclass
class CompareOptions(Options):
    a: Path = option(help=f"The reference model ({_FILES}).", argument=True, metavar="A")
    b: Path = option(help="The model to compare with it (any of the same).", argument=True, metavar="B")
    input_shape: tuple[str, ...] = option((), flags=("--input-shape", "-s"), metavar="SHAPE", panel=INPUT, convert=shapes,
                                          help="Input shape, e.g. 1,3,224,224; repeat for several inputs. Default: the "
                                               "ONNX side's declared shapes, or guessed from the first layer.")
    inputs: Path | None = option(None, metavar="NPZ", panel=INPUT,
                                 help="Real inputs: an .npz with one array per input (by name, or in order); "
                                      "NAME@0, NAME@1... for several sets.")
    arch: str | None = option(None, metavar="PKG.MODULE:FN", panel=INPUT, help="Model factory for a state_dict A.")
    arch_b: str | None = option(None, metavar="PKG.MODULE:FN", panel=INPUT,
                                help="Model factory for a state_dict B (default: --arch).")
    arch_kwargs: str | None = option(None, metavar="JSON", panel=INPUT, help="JSON keyword arguments for the factories.")
    trust_pickle: bool = option(False, panel=INPUT,
                                help="Allow unpickling code objects (full modules, YOLO dicts): only for files you trust.")
    code_paths: tuple[Path, ...] = option((), flags="--code-path", metavar="DIR", panel=INPUT,
                                          help="Directory to put on the import path; repeatable.")
    trials: int = option(2, metavar="N", panel=VERIFICATION, minimum=1,
                         help="Random input sets to compare on (ignored with --inputs).")
    seed: int = option(0, metavar="N", panel=VERIFICATION, check=_seed, help="Seed of the random inputs.")
    atol: float | None = option(None, metavar="FLOAT", panel=VERIFICATION, check=finite_non_negative,
                                help="Absolute tolerance (default by the looser dtype of the two: 1e-6 float32).")
    rtol: float | None = option(None, metavar="FLOAT", panel=VERIFICATION, check=finite_non_negative,
                                help="Tolerance relative to each output's largest magnitude (default by the looser "
                                     "dtype of the two: 1e-4 float32, 1e-2 float16, 5e-2 bfloat16).")
    layers: bool = option(False, panel=VERIFICATION,
                          help="Compare intermediate layers too and name the first one beyond tolerance.")
    save_inputs: Path | None = option(None, metavar="NPZ", panel=OUTPUT, help="Write the inputs used to this .npz.")
    save_outputs: Path | None = option(None, metavar="NPZ", panel=OUTPUT,
                                       help="Write both models' outputs to this .npz (a:NAME, b:NAME).")
