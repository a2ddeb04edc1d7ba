"""Keep the base classes: the untouched base detector and an adapted branch in one ``DetectionModel``.

An adapter trained with ``keep_base`` changes layers ``L`` (its lowest adapted layer) to the head only, so layers
``0..L-1`` are the base's. The merged model runs that trunk once, then the base's own layers ``L..`` (the base
classes, exactly the base model's outputs) and the adapted copies of them (the new classes, exactly the adapter's
outputs), and joins the two decoded outputs along the anchor axis, each padded with zero scores for the other's
classes: ``(B, 4 + nc_base + nc_new, A_base + A_new)``. Ultralytics' NMS works per class, so the base classes
keep the base model's detections (up to the shared ``max_det`` cap) and the new ones the adapter's.
With ``keep_base="head"``, L is the head and the adapted layers below it are a shared trunk: only the head is
doubled, and the base classes are the base head's on adapted features (kept by distillation, not exactly). With
``keep_base="classes"`` (:func:`keep_classes_model`), the adapted box branch is shared too: one set of anchors and
boxes, and beside the adapter's class branch the base's whole class branch on the adapted features.

Built from Ultralytics' own layer bookkeeping (``m.i``, ``m.f``, ``model.save``, as ``parse_model`` sets them),
so fusion, ``info``, the exporter and ``AutoBackend`` treat it as any detector; ``model.model[-1]`` is a ``Detect``
whose ``nc`` is the total class count.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules.head import Detect
from ultralytics.nn.tasks import DetectionModel

from ..integrations.ultralytics import LayerRouting, forget_checkpoint_path, retype
from ..keep_modes import SHARED_BOXES, SHARED_TRUNK, keep_base_record

IMAGE = "image"  # ``f`` of a branch layer that reads the network input (a branch from layer 0)


def layer_of(module_name: str) -> int | None:
    """The Ultralytics layer index of ``model.<i>.<...>``, else ``None``."""
    parts = module_name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "model" and parts[1].isdigit() else None


def branch_start(targets: Iterable[str]) -> int:
    """The first layer an adapter changes: where the branch leaves the shared trunk."""
    layers = [i for i in (layer_of(t) for t in targets) if i is not None]
    if not layers:
        raise ValueError("keep_base needs adapters inside the detector's layers (model.<i>...); none were found.")
    return min(layers)


def check_keep_base(model: nn.Module, base_names: dict[int, str], names: dict[int, str] | None) -> None:
    """One-line errors for a YOLO detector (the family checked the model's class) or a class list that cannot keep
    the base classes."""
    if getattr(model.model[-1], "one2one_cv2", None) is not None:
        raise ValueError("keep_base needs a YOLO head with NMS (YOLOv5u, v8, 11); this model has an end-to-end "
                         "(YOLO26-style) head, whose top-k output cannot be joined with another: use such a base.")
    if not names:
        raise ValueError("keep_base adds new classes beside the base's: pass the new class names (names=[...], "
                         "the dataset's names).")
    if names == base_names:
        raise ValueError("keep_base adds new classes beside the base's, but these are the base's own classes: "
                         "train without keep_base to adapt them.")
    taken = {v: k for k, v in base_names.items()}
    for i, name in names.items():
        if name in taken:
            raise ValueError(f"keep_base: new class {i} '{name}' is already base class {taken[name]}, so the model "
                             f"would have two '{name}' classes; rename it in the dataset YAML (e.g. '{name}_new'), "
                             "or train without keep_base.")


class KeepBaseDetect(Detect):
    """The two heads as one ``Detect``: base classes first, then the new ones (see the module docstring).

    Reads the base head's inputs, then the branch head's. In training mode it is the branch's head alone (its raw
    outputs and loss: the new classes, as the adapter was trained).
    """

    def __init__(self, base: Detect, branch: Detect) -> None:
        nn.Module.__init__(self)  # not Detect.__init__: the convolutions are the two heads'
        self.base, self.branch = base, branch
        self.nc_base = base.nc
        self.nc = base.nc + branch.nc
        self.nl, self.reg_max = base.nl, base.reg_max
        self.no = self.nc + 4 * self.reg_max
        self.stride = base.stride
        self.cv2 = self.cv3 = None  # Detect attributes Ultralytics reads (is_fused, fuse); no convs of its own

    @property
    def end2end(self) -> bool:
        return False  # both heads use NMS (check_keep_base refuses end-to-end heads)

    @end2end.setter
    def end2end(self, value: bool) -> None:
        """The exporter and validators set this on every head; Detect's setter would warn about the missing cv2."""

    def forward(self, x: list[torch.Tensor]):
        if self.training:
            return self.branch(x[self.base.nl:])
        base, branch = self.base(x[:self.base.nl]), self.branch(x[self.base.nl:])
        y = self.join(base[0] if isinstance(base, tuple) else base, branch[0] if isinstance(branch, tuple) else branch)
        return y if self.export else (y, branch[1] if isinstance(branch, tuple) else {})

    def join(self, base: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        # Pad (not a zeros tensor): no constant of anchors x classes in the ONNX file, and INT8 keeps it float
        # with the rest of the decode
        base = F.pad(base, (0, 0, 0, self.nc - self.nc_base))  # python ints, not traced shapes: constant pads
        branch = torch.cat((branch[:, :4], F.pad(branch[:, 4:], (0, 0, self.nc_base, 0))), 1)
        return torch.cat((base, branch), 2)


class KeepBaseDetectionModel(LayerRouting, DetectionModel):
    """A base detector with a keep-base branch; built by :func:`keep_base_model`, never from a YAML."""

    def layer_input(self, m: nn.Module, x, y: list, image: torch.Tensor):
        """A layer whose ``f`` is IMAGE reads the input image, which the stock loop keeps nowhere (a branch from
        layer 0)."""
        return image if isinstance(m.f, str) else super().layer_input(m, x, y, image)

    def init_criterion(self):
        """The branch's loss (its classes, its head), as the adapter was trained; with one head (shared boxes),
        Ultralytics' loss over all classes."""
        from ultralytics.utils.loss import v8DetectionLoss

        head = self.model[-1]
        if not isinstance(head, KeepBaseDetect):
            return super().init_criterion()
        return v8DetectionLoss(SimpleNamespace(args=self.args, model=[head.branch], parameters=self.parameters))

    keep_mode: bool | str = True  # the keep_base mode it was built for (keep_base_model, keep_classes_model)

    @property
    def keep_base(self) -> dict:
        """``{"layer": L, "base_classes": n}``: where the branch starts, how many classes come first, and what the
        mode shares (``keep_modes.keep_base_record``), as adapter files record it."""
        return {"layer": self.branch_layer, "base_classes": self.model[-1].nc_base, **keep_base_record(self.keep_mode)}


def _branch_f(f, j: int, start: int, offset: int):
    """``f`` of branch layer ``j``: trunk outputs (below ``start``) are shared, later ones are the branch's."""
    if isinstance(f, list):
        return [_branch_f(k if k != -1 else j - 1, j, start, offset) for k in f]
    k = j - 1 if f == -1 else f
    if k < 0:
        return IMAGE
    return k if k < start else k + offset


def keep_base_model(base: DetectionModel, branch: DetectionModel, start: int,
                    shared_trunk: bool = False) -> KeepBaseDetectionModel:
    """``base`` (plain) and ``branch`` (the same architecture, changed from layer ``start`` on; merged, or with
    adapters for a reference) as one model with ``base.names`` followed by ``branch.names``. Inputs are copied.
    ``shared_trunk``: the trunk (layers below ``start``) is the branch's, adapted, and the base's layers from
    ``start`` on read it (``keep_base="head"``: only the head is doubled)."""
    head = len(base.model) - 1
    if not 0 <= start <= head:
        raise ValueError(f"The branch start {start} is not a layer of this {head + 1}-layer model.")
    offset = head - start  # branch layer j sits at index j + offset, after the base's layers 0..head-1
    layers = [copy.deepcopy(m) for m in (branch if shared_trunk else base).model[:start]]
    layers += [copy.deepcopy(m) for m in base.model[start:head]]
    for j in range(start, head):
        m = copy.deepcopy(branch.model[j])
        m.i, m.f = j + offset, _branch_f(m.f, j, start, offset)
        layers.append(m)
    base_head, branch_head = copy.deepcopy(base.model[head]), copy.deepcopy(branch.model[head])
    joined = KeepBaseDetect(base_head, branch_head)
    branch_from = _branch_f(branch_head.f, head, start, offset)
    joined.i, joined.f, joined.type = head + offset, [*base_head.f, *branch_from], "KeepBaseDetect"
    joined.np = sum(p.numel() for p in joined.parameters())
    layers.append(joined)

    model = copy.deepcopy(base)
    retype(model, KeepBaseDetectionModel)
    model.model = nn.Sequential(*layers)
    model.save = sorted({k for m in layers for k in (m.f if isinstance(m.f, list) else [m.f])
                         if isinstance(k, int) and k >= 0})
    model.names = {i: n for i, n in enumerate([*base.names.values(), *branch.names.values()])}
    model.yaml = {**base.yaml, "nc": len(model.names)}
    model.branch_layer, model.keep_mode = start, SHARED_TRUNK if shared_trunk else True
    model.criterion = None
    model.__dict__.pop("visionpeft", None)
    forget_checkpoint_path(model)
    return model


class ClassBranches(nn.Module):
    """Two class branches of a ``Detect`` head on the same features, their class channels concatenated (base's
    first), so the head's box and class bookkeeping stays Ultralytics' own."""

    def __init__(self, base: nn.Module, new: nn.Module) -> None:
        super().__init__()
        self.base, self.new = base, new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.base(x), self.new(x)), 1)


def keep_classes_model(base: DetectionModel, branch: DetectionModel) -> KeepBaseDetectionModel:
    """``branch`` (merged, every layer adapted) with the base's whole class branch (``cv3``, untouched) beside its
    own on the same adapted features (``keep_base="classes"``): one network run, one set of boxes (the branch's),
    base classes then new ones. The base classes are the base's class convs on the adapted features, kept by
    distillation (not exactly). Inputs are copied."""
    model = copy.deepcopy(branch)
    head, base_head = model.model[-1], base.model[-1]
    head.cv3 = nn.ModuleList(ClassBranches(copy.deepcopy(old), new)
                             for old, new in zip(base_head.cv3, head.cv3, strict=True))
    head.nc_base = base_head.nc
    head.nc = base_head.nc + head.nc
    head.no = head.nc + 4 * head.reg_max
    head.np = sum(p.numel() for p in head.parameters())
    retype(model, KeepBaseDetectionModel)
    model.names = {i: n for i, n in enumerate([*base.names.values(), *branch.names.values()])}
    model.yaml = {**model.yaml, "nc": head.nc}
    model.branch_layer, model.keep_mode = len(model.model) - 1, SHARED_BOXES
    model.criterion = None
    model.__dict__.pop("visionpeft", None)
    forget_checkpoint_path(model)
    return model


def single_path_model(base: DetectionModel, adapted: DetectionModel) -> DetectionModel:
    """``adapted`` (a merged plain adapter) with the base's class outputs beside its own, in one path: the
    alternative to a branch that runs the shared trunk once, before any distillation. The new classes are the
    adapter's outputs exactly; the base classes are the base's class convs on the *adapted* features, so they
    show what adapting every layer costs the base classes (the keep-base benchmark's ``keep_base: single`` row).
    Inputs are copied; ``names`` are the base's followed by the adapter's.
    """
    check_keep_base(base, base.names, adapted.names)
    model = copy.deepcopy(adapted)
    head, base_head = model.model[-1], base.model[-1]
    for branch, base_branch in zip(head.cv3, base_head.cv3, strict=True):
        new, old = branch[-1], base_branch[-1]  # the 1x1 class-output convs (nc output channels)
        joined = nn.Conv2d(old.in_channels, old.out_channels + new.out_channels, 1)
        with torch.no_grad():
            joined.weight.copy_(torch.cat((old.weight, new.weight)))
            joined.bias.copy_(torch.cat((old.bias, new.bias)))
        branch[-1] = joined
    head.nc = base_head.nc + head.nc
    head.no = head.nc + 4 * head.reg_max
    model.names = {i: n for i, n in enumerate([*base.names.values(), *adapted.names.values()])}
    model.yaml = {**model.yaml, "nc": head.nc}
    model.__dict__.pop("visionpeft", None)
    forget_checkpoint_path(model)
    return model
