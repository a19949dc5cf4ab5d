"""A detector shaped like torchvision's one-stage detectors (RetinaNet / SSDlite): a backbone of
conv -> BatchNorm -> ReLU, a head of class and box convs, and the post-processing the model's
own forward runs in eval mode -- sigmoid scores, top-k, a score threshold (data-dependent
sizes), box decoding, ``resize_boxes`` (a 1-D tensor times a 0-d tensor built from Python
numbers) and a greedy NMS with Python control flow. Outputs are a list of dicts per image
(``boxes`` float, ``scores`` float, ``labels`` int64), as torchvision returns them.

Stored in float16 (``tiny_detector(half=True)``, as YOLO-style checkpoints are), a fold rounds
the weights to fp16: the head's outputs move by ~1e-3 (well within fp16's tolerance), and
near-equal scores swap places in top-k and NMS, so ``boxes`` and ``labels`` differ by whole
detections -- what real detectors show in float32 on their far larger top-k (raw head outputs
agreeing to 1e-7, "labels: max abs inf").
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model


class Head(nn.Module):
    def __init__(self, c: int, anchors: int, classes: int, norm: bool = False):
        super().__init__()
        self.cls_logits = nn.Conv2d(c, anchors * classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(c, anchors * 4, 3, padding=1)
        self.cls_norm = nn.BatchNorm2d(anchors * classes) if norm else nn.Identity()

    def forward(self, x):
        return self.cls_norm(self.cls_logits(x)), self.bbox_pred(x)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    order = scores.argsort(descending=True)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= box_iou(boxes[i:i + 1], boxes)[0] > threshold
    return torch.tensor(keep, dtype=torch.long)


class TinyDetector(nn.Module):
    def __init__(self, classes: int = 4, anchors: int = 3, topk: int = 40, score_thresh: float = 0.05,
                 original_size=(96, 80), head_norm: bool = False):
        super().__init__()
        self.classes, self.anchors, self.topk, self.score_thresh = classes, anchors, topk, score_thresh
        self.original_size = original_size
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.head = Head(32, anchors, classes, head_norm)

    def forward(self, images):
        cls, reg = self.head(self.backbone(images))
        return self.postprocess(cls, reg, tuple(images.shape[-2:]))

    def postprocess(self, cls, reg, size):
        n, _, h, w = cls.shape
        results = []
        for i in range(n):
            scores = cls[i].sigmoid().flatten()
            top, idx = scores.topk(min(self.topk, scores.numel()))
            keep = top > self.score_thresh
            top, idx = top[keep], idx[keep]
            labels = (idx // (h * w)) % self.classes
            cell = idx % (h * w)
            anchor = idx // (h * w * self.classes)
            d = reg[i].view(self.anchors, 4, h * w)[anchor, :, cell]
            cx = (cell % w).float() * 4 + 2 + d[:, 0]
            cy = (cell // w).float() * 4 + 2 + d[:, 1]
            bw, bh = 8 * d[:, 2].clamp(max=4).exp(), 8 * d[:, 3].clamp(max=4).exp()
            boxes = torch.stack((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), dim=1)
            boxes = resize_boxes(boxes, size, self.original_size)
            kept = greedy_nms(boxes, top, 0.5)
            results.append({"boxes": boxes[kept], "scores": top[kept], "labels": labels[kept]})
        return results


def resize_boxes(boxes, new_size, original_size):
    """As torchvision's ``transform.resize_boxes``: 1-D coordinates times 0-d ratios."""
    ratios = [torch.tensor(s_orig, dtype=torch.float32) / torch.tensor(s, dtype=torch.float32)
              for s, s_orig in zip(new_size, original_size)]
    ratio_height, ratio_width = ratios
    xmin, ymin, xmax, ymax = boxes.unbind(1)
    xmin = xmin * ratio_width
    xmax = xmax * ratio_width
    ymin = ymin * ratio_height
    ymax = ymax * ratio_height
    return torch.stack((xmin, ymin, xmax, ymax), dim=1)


def tiny_detector(seed: int = 0, half: bool = False, **kw) -> TinyDetector:
    torch.manual_seed(seed)
    m = _randomize(TinyDetector(**kw), seed).eval()
    return m.half() if half else m
