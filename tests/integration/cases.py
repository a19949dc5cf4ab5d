"""The integration cases: which real models, in which form, at which input size, and what is
already known about them. The tests and ``coverage_table.py`` both read this list.

``form`` is how a user has the checkpoint: ``module`` (a pickled ``nn.Module``, run with
``--trust-pickle``) or ``state_dict`` (tensors only, run with ``--arch`` through
``arch_factory``). Input sizes are the smallest each model runs at comfortably, so the sweep
fits two shared CPU cores.

``bn_left`` is what a case may keep after ``fold-bn``: a count and why no exact fold exists
(checked against the reasons the tool reports); BatchNorms the tool leaves to the host's own
``fuse()`` are allowed in .pt outputs, which that host loads. ``KNOWN`` are failure signatures
of what is still open: a test whose every problem matches one is an expected failure, and
passes as soon as the fix lands.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    name: str
    source: str  # arch_factory.FACTORIES key: timm, torchvision, detector
    model: str
    shape: tuple[int, ...] = (1, 3, 64, 64)
    form: str = "module"  # module | state_dict
    kwargs: dict = field(default_factory=dict, hash=False)
    bn_left: int = 0  # BatchNorms fold-bn may keep (pre-activation BNs, ...): see `why`
    why: str = ""
    verify_at: tuple[str, ...] = ()  # detectors: compare these modules' outputs
    reparam: bool = False  # has timm's own reparameterize_model counterpart

    @property
    def arch_kwargs(self) -> dict:
        return {"name": self.model, **self.kwargs}


SD, MOD = "state_dict", "module"
PRE_ACT = "pre-activation BatchNorms read a concatenation of earlier feature maps that other layers read too"
AUX = "the auxiliary classifier's BatchNorms do not run in eval mode"
BRANCH = ("branch BatchNorms on a block's input that other branches read too (x + bn(x), "
          "conv(x) + conv1(x) + x then bn): only structural re-parameterisation removes them")
WS = ("no BatchNorm layer: ScaledStdConv2d standardises its weight with F.batch_norm (batch statistics "
      "of the weight); a .onnx written from it keeps those as BatchNormalization nodes on constants")

CLASSIFIERS: list[Case] = [
    # torchvision: distributed as state_dicts, also pickled whole by users
    Case("tv_resnet18", "torchvision", "resnet18", form=SD),
    Case("tv_resnet50", "torchvision", "resnet50"),
    Case("tv_mobilenet_v2", "torchvision", "mobilenet_v2", form=SD),
    Case("tv_mobilenet_v3_small", "torchvision", "mobilenet_v3_small"),
    Case("tv_mobilenet_v3_large", "torchvision", "mobilenet_v3_large", form=SD),
    Case("tv_efficientnet_b0", "torchvision", "efficientnet_b0", form=SD),
    Case("tv_efficientnet_v2_s", "torchvision", "efficientnet_v2_s"),
    Case("tv_regnet_y_400mf", "torchvision", "regnet_y_400mf"),
    Case("tv_densenet121", "torchvision", "densenet121", form=SD, bn_left=62, why=PRE_ACT),
    Case("tv_inception_v3", "torchvision", "inception_v3", shape=(1, 3, 80, 80), kwargs={"init_weights": True},
         bn_left=2, why=AUX),
    Case("tv_googlenet", "torchvision", "googlenet", form=SD, kwargs={"init_weights": True}, bn_left=2, why=AUX),
    Case("tv_shufflenet_v2_x0_5", "torchvision", "shufflenet_v2_x0_5", form=SD),
    Case("tv_resnet34_frozen_bn", "torchvision_frozen", "resnet34", form=SD),
    # timm: state_dicts from the hub, pickled modules from training scripts
    Case("resnet18d", "timm", "resnet18d", form=SD),
    Case("mobilenetv2_100", "timm", "mobilenetv2_100"),
    Case("mobilenetv3_large_100", "timm", "mobilenetv3_large_100", form=SD),
    Case("tf_mobilenetv3_small_100", "timm", "tf_mobilenetv3_small_100"),
    Case("mobilenetv4_conv_small", "timm", "mobilenetv4_conv_small", form=SD),
    Case("tf_efficientnet_b0", "timm", "tf_efficientnet_b0", form=SD),
    Case("efficientnet_b0_frozen_bn", "timm_frozen", "efficientnet_b0", form=SD),
    Case("fbnetv3_b", "timm", "fbnetv3_b", form=SD),
    Case("mixnet_s", "timm", "mixnet_s"),
    Case("rexnet_100", "timm", "rexnet_100", form=SD),
    Case("regnety_002", "timm", "regnety_002"),
    Case("convnext_atto", "timm", "convnext_atto", form=SD),
    Case("repvgg_a0", "timm", "repvgg_a0", reparam=True, bn_left=17, why=BRANCH),
    Case("mobileone_s0", "timm", "mobileone_s0", form=SD, reparam=True, bn_left=35, why=BRANCH),
    Case("fastvit_t8", "timm", "fastvit_t8", reparam=True, bn_left=24, why=BRANCH),
    Case("repghostnet_050", "timm", "repghostnet_050", form=SD, reparam=True, bn_left=32, why=BRANCH),
    Case("repvit_m0_9", "timm", "repvit_m0_9", reparam=True, bn_left=25, why=BRANCH),
    Case("levit_128s", "timm", "levit_128s", shape=(1, 3, 224, 224), form=SD),
    Case("nf_resnet26", "timm", "nf_resnet26", bn_left=29, why=WS),
    Case("cspdarknet53", "timm", "cspdarknet53", form=SD),
    Case("darknet53", "timm", "darknet53"),
    Case("cs3darknet_focus_s", "timm", "cs3darknet_focus_s", form=SD),
    Case("hrnet_w18_small", "timm", "hrnet_w18_small"),
    Case("ghostnet_100", "timm", "ghostnet_100", form=SD),
    Case("dla34", "timm", "dla34"),
    Case("tresnet_m", "timm", "tresnet_m", form=SD),
    Case("ese_vovnet19b_dw", "timm", "ese_vovnet19b_dw"),
    Case("resnest14d", "timm", "resnest14d", form=SD),
    Case("dpn68", "timm", "dpn68", bn_left=27, why=PRE_ACT + " (and max-pooled ones)"),
    Case("efficientvit_b0", "timm", "efficientvit_b0", form=SD),
    Case("mobilevit_xxs", "timm", "mobilevit_xxs"),
]

DETECTORS: list[Case] = [
    Case("fasterrcnn_mobilenet_v3_large_320_fpn", "detector", "fasterrcnn_mobilenet_v3_large_320_fpn",
         shape=(1, 3, 128, 128), kwargs={"min_size": 128, "max_size": 128},
         verify_at=("backbone", "rpn.head")),
    Case("retinanet_resnet50_fpn", "detector", "retinanet_resnet50_fpn", shape=(1, 3, 128, 128),
         kwargs={"min_size": 128, "max_size": 128}, verify_at=("head",)),
    Case("ssdlite320_mobilenet_v3_large", "detector", "ssdlite320_mobilenet_v3_large",
         shape=(1, 3, 320, 320), verify_at=("head",)),
]



@dataclass(frozen=True)
class YoloCase:
    """A YOLO model built from its package's own yaml, saved as that package's trainer saves,
    loaded back by that package's own loader (which fuses Conv + BatchNorm itself)."""

    name: str
    host: str  # yolov5 | ultralytics
    cfg: str  # a yaml the package ships, or one in this directory
    commands: tuple[str, ...] = ("fold-bn", "optimize")
    shape: tuple[int, ...] = (1, 3, 64, 64)


YOLO: list[YoloCase] = [
    YoloCase("yolov5s_v5_focus", "yolov5", "yolov5s_v5_focus.yaml", ("fold-bn", "focus-to-conv", "optimize")),
    YoloCase("yolov5s", "yolov5", "yolov5s.yaml"),
    YoloCase("yolov5n_p6", "yolov5", "hub/yolov5n6.yaml", shape=(1, 3, 128, 128)),
    YoloCase("yolov8n", "ultralytics", "yolov8n.yaml"),
]

CASES = {c.name: c for c in CLASSIFIERS + DETECTORS}


def select(cases: list[Case], pattern: str | None) -> list[Case]:
    """Cases whose name matches any of the comma-separated shell patterns (all when None)."""
    if not pattern:
        return list(cases)
    pats = [p.strip() for p in pattern.split(",") if p.strip()]
    return [c for c in cases if any(fnmatch.fnmatch(c.name, p) for p in pats)]


# --------------------------------------------------------------------------------------------
# what the suite judges, and the failures already known


@dataclass(frozen=True)
class Problem:
    step: str  # "fold-bn.pt", "onnx-default", "yolov5-v6:fold-bn", ...
    kind: str  # exit | reload | parity | bn-left | bn-unreported | needs-modelsurgeon | export | loader
    detail: str

    def __str__(self) -> str:
        return f"{self.step}: {self.kind}: {self.detail}"


@dataclass(frozen=True)
class Known:
    reason: str
    step: str = "*"  # shell pattern on Problem.step
    kind: str = "*"
    pattern: str = ""  # regular expression searched in Problem.detail
    cases: tuple[str, ...] = ()  # case names (all when empty)

    def matches(self, case: str, p: Problem) -> bool:
        return ((not self.cases or case in self.cases) and fnmatch.fnmatch(p.step, self.step)
                and fnmatch.fnmatch(p.kind, self.kind) and re.search(self.pattern, p.detail) is not None)


KNOWN: list[Known] = [
    Known("open: the model's own float32 rounding: the fold is exact in float64 (4e-13) but its fp32 "
          "weights land 10x further from the float64 original than the original's own rounding, so the "
          "noise-aware check still refuses", kind="exit", pattern="^1: .*parity failed", cases=("fbnetv3_b",)),
    Known("open on ONNX inputs: a BatchNorm before a Linear (LeViT's NormLinear heads: mean -> BatchNorm1d "
          "-> Linear) is not folded into the layer after it (the PyTorch side does)", step="onnx-*",
          kind="bn-left", pattern="comes from (Tensor.mean|ReduceMean)", cases=("levit_128s",)),
    Known("open on ONNX inputs: a BatchNorm after a concatenation of convolutions (timm's MixedConv2d) is "
          "not split into them (the PyTorch side does)", step="onnx-*", kind="bn-left",
          pattern="comes from (cat|Concat) ", cases=("mixnet_s",)),
    Known("open: weight standardisation (timm's ScaledStdConv2d calls F.batch_norm on its weight) is "
          "exported as BatchNormalization nodes on constants; a .onnx output keeps them (the exported "
          "graph is not constant-folded yet) and its report counts them as BatchNorms",
          step="report", kind="bn-count", cases=("nf_resnet26",)),
]


def known_reasons(case: str, problems: list[Problem]) -> tuple[list[str], list[Problem]]:
    """(reasons of the known failures among ``problems``, the problems no known failure explains)."""
    reasons: list[str] = []
    unknown: list[Problem] = []
    for p in problems:
        k = next((k for k in KNOWN if k.matches(case, p)), None)
        if k is None:
            unknown.append(p)
        elif k.reason not in reasons:
            reasons.append(k.reason)
    return reasons, unknown
