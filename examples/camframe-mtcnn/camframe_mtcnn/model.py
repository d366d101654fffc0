"""MTCNN as one ``nn.Module`` whose output says which PNet window proposed each face.

facenet-pytorch's ``MTCNN.detect`` runs the cascade under ``no_grad`` and returns numpy boxes,
so nothing in its output can be traced back to a feature map. ``MTCNNDetector`` runs the same
cascade (image pyramid -> PNet -> NMS -> RNet -> NMS -> ONet -> NMS, with facenet-pytorch's
own networks, weights and helpers) but keeps, for every final face, the pyramid level and the
PNet output cell that proposed it, and keeps PNet's face logit maps in the autograd graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
from facenet_pytorch.models.utils.detect_face import batched_nms_numpy, bbreg, imresample, pad, rerec
from torch import Tensor, nn
from torchvision.ops import batched_nms

__all__ = ["MTCNNDetector", "normalise"]

# PNet has no padding, so its feature maps cover only the middle of a pyramid level, and
# camframe, which stretches a layer's map over the whole input, would draw them off the faces.
# Padding each level by PAD grey pixels re-centres them: a cell of ``pnet.prelu2`` (or of
# ``pnet.prelu1``) is then drawn within one level pixel, 1/12 of a window, of what it sees.
# PAD is even, so PNet's windows stay on their grid; the output cells whose window reaches into
# the padding propose nothing, so the proposals are exactly those of the unpadded cascade.
PAD = 2
CELL, STRIDE = 12, 2  # PNet's window and step, in pixels of a pyramid level


def normalise(images: Tensor) -> Tensor:
    """RGB values in 0..255 -> the range the MTCNN networks were trained on (about -1..1)."""
    return (images - 127.5) * 0.0078125


class MTCNNDetector(nn.Module):
    """Face detector: ``forward(x)`` on a normalised RGB batch ``(B, 3, H, W)`` returns a dict.

    ``boxes`` ``(N, 4)`` xyxy in input pixels, ``probs`` ``(N,)`` ONet face probabilities,
    ``image`` ``(N,)`` batch index of each face; and its provenance: ``level`` ``(N,)`` the pyramid
    level, ``cell`` ``(N, 2)`` the (row, column) of the PNet output cell that proposed it, in
    ``logits[level]``, the PNet face logit maps ``(B, h, w)`` of each level (differentiable),
    taken at ``scales[level]``.
    """

    def __init__(self, min_face_size: int = 20, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 factor: float = 0.709, pretrained: bool = True) -> None:
        super().__init__()
        self.pnet, self.rnet, self.onet = PNet(pretrained), RNet(pretrained), ONet(pretrained)
        self.min_face_size, self.thresholds, self.factor = min_face_size, tuple(thresholds), factor

    def scales(self, h: int, w: int) -> list[float]:
        """The image pyramid: faces of ``min_face_size`` up to the whole image fill a 12-pixel window."""
        scales, scale = [], CELL / self.min_face_size
        while min(h, w) * scale >= CELL:
            scales.append(scale)
            scale *= self.factor
        return scales

    def pnet_logits(self, level: Tensor) -> tuple[Tensor, Tensor]:
        """PNet on one (padded) pyramid level: box offsets ``(B, 4, h, w)`` and the face logit
        ``(B, h, w)`` (PNet's softmax is over two classes, so the logit is their difference)."""
        p = self.pnet
        features = p.prelu3(p.conv3(p.prelu2(p.conv2(p.pool1(p.prelu1(p.conv1(level)))))))
        two = p.conv4_1(features)
        return p.conv4_2(features), two[:, 1] - two[:, 0]

    def forward(self, x: Tensor) -> dict:
        _, _, h, w = x.shape
        scales = self.scales(h, w)
        logits, found = [], []
        long = torch.long
        none = x.new_zeros(0, 5), x.new_zeros(0, 4), x.new_zeros(0, dtype=long), x.new_zeros(0, 3, dtype=long)
        for level, scale in enumerate(scales):
            resized = F.pad(imresample(x, (int(h * scale + 1), int(w * scale + 1))), [PAD] * 4)
            reg, logit = self.pnet_logits(resized)
            logits.append(logit)
            found.append(self._proposals(reg.detach(), logit.detach(), level, scale))
        boxes, reg, image, origin = (torch.cat(parts) for parts in zip(none, *found))

        # PNet stage: NMS over all levels, then PNet's own box regression.
        keep = batched_nms(boxes[:, :4], boxes[:, 4], image, 0.7)
        boxes, reg, image, origin = boxes[keep], reg[keep], image[keep], origin[keep]
        size = boxes[:, 2:4] - boxes[:, :2]
        boxes = torch.cat([boxes[:, :2] + reg[:, :2] * size, boxes[:, 2:4] + reg[:, 2:] * size, boxes[:, 4:]], 1)
        boxes = rerec(boxes)

        # RNet re-scores a 24-pixel crop of each box; NMS; its box regression.
        boxes, reg, image, origin = self._stage(self.rnet, x, boxes, image, origin, 24, self.thresholds[1])
        keep = batched_nms(boxes[:, :4], boxes[:, 4], image, 0.7)
        boxes, image, origin = rerec(bbreg(boxes[keep], reg[keep])), image[keep], origin[keep]
        # ONet does the same on 48-pixel crops; the last NMS measures overlap over the smaller box.
        boxes, reg, image, origin = self._stage(self.onet, x, boxes, image, origin, 48, self.thresholds[2])
        boxes = bbreg(boxes, reg)
        keep = batched_nms_numpy(boxes[:, :4], boxes[:, 4], image, 0.7, "Min")
        boxes, image, origin = boxes[keep], image[keep], origin[keep]

        return {"boxes": boxes[:, :4], "probs": boxes[:, 4], "image": image, "level": origin[:, 0],
                "cell": origin[:, 1:], "logits": logits, "scales": scales}

    def _proposals(self, reg: Tensor, logit: Tensor, level: int, scale: float) -> tuple[Tensor, ...]:
        """PNet windows above the first threshold, NMS'd within the level: rows
        ``[x1, y1, x2, y2, prob]``, their offsets, image indices and ``[level, row, col]``."""
        k = PAD // STRIDE
        prob = logit[:, k:-k, k:-k].sigmoid()
        image, row, col = (prob >= self.thresholds[0]).nonzero(as_tuple=True)
        corner = torch.stack([col, row], 1).to(prob.dtype) * STRIDE
        boxes = torch.cat([((corner + 1) / scale).floor(), ((corner + CELL) / scale).floor(),
                           prob[image, row, col, None]], 1)
        keep = batched_nms(boxes[:, :4], boxes[:, 4], image, 0.5)
        origin = torch.stack([torch.full_like(row, level), row + k, col + k], 1)
        return boxes[keep], reg[image, :, row + k, col + k][keep], image[keep], origin[keep]

    @staticmethod
    def _stage(net: nn.Module, x: Tensor, boxes: Tensor, image: Tensor, origin: Tensor, size: int,
               threshold: float) -> tuple[Tensor, ...]:
        """Run ``net`` on a ``size``-pixel crop of each box; keep those it scores above ``threshold``,
        as rows ``[x1, y1, x2, y2, prob]`` with ``net``'s box offsets."""
        h, w = x.shape[-2:]
        inside = (boxes[:, 2] >= 1) & (boxes[:, 3] >= 1) & (boxes[:, 0] < w) & (boxes[:, 1] < h)
        boxes, image, origin = boxes[inside], image[inside], origin[inside]
        if not len(boxes):
            return boxes[:, :5], boxes.new_zeros(0, 4), image, origin
        y, ey, x0, ex = pad(boxes, w, h)  # 1-based, clipped to the image
        crops = torch.cat([imresample(x[i:i + 1, :, y[k] - 1:ey[k], x0[k] - 1:ex[k]], (size, size))
                           for k, i in enumerate(image.tolist())])
        out = net(crops.detach())  # only PNet's logits stay in the autograd graph
        reg, prob = out[0].detach(), out[-1][:, 1].detach()
        ok = prob > threshold
        return torch.cat([boxes[ok, :4], prob[ok, None]], 1), reg[ok], image[ok], origin[ok]
