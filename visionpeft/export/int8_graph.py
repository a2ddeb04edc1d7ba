"""Graph rewrites around onnxruntime's static INT8 quantization of a YOLO ONNX export (used by ``quantize.to_int8``).

Which nodes stay float (``float_nodes``): the plain recipe destroys YOLO: the head's output concatenates box pixels
(0..imgsz) with class probabilities (0..1), and one int8 scale for that tensor rounds every score to zero (mAP50-95
0.34 -> 0.00, onnxruntime issues #14233, #10787). So the box and score *decode* stays float: every node after the
head's last convolutions (the DFL softmax and projection, the anchor/stride arithmetic, the class sigmoid, the
concats), found from the graph rather than by name. So do the convolutions that feed only the decode (the box and
class logits), whose int8 rounding moves scores and box edges for little speed. The first convolution also stays
float: it sees the raw image, gains little from int8 (three input channels) and is where input rounding hurts most.

Before quantizing, the DFL decode is rewritten to compute the same numbers faster (``last_axis_dfl``): Ultralytics'
graph takes the softmax over axis 1 of a ``(1, 16, 4, anchors)`` tensor and projects it with a 1x1 conv; onnxruntime
runs a softmax over a non-last axis as transpose + softmax + transpose, and the conv through NCHWc reorders. Taking
the softmax over the last axis and projecting with a ``(16, 1)`` MatMul gives bit-identical outputs at ~10 % less
time for the whole model on 2 CPU threads (measured in ``scripts/bench_edge.py``); it runs in float like the rest of
the decode. Nearest upsampling becomes block copies (``upsample_as_concat``), and after quantizing, each Concat's
inputs take its output's scale (``share_concat_params``), so that onnxruntime copies them instead of requantizing.
"""

from __future__ import annotations

import numpy as np

#: ops whose weights make them worth quantizing; the decode tail is what no such op follows
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}

def _projection(node, initializers: dict) -> np.ndarray | None:
    """The weights of a DFL projection node, or None: a 1x1 conv with one output (or, after ``last_axis_dfl``, a
    ``(reg_max, 1)`` MatMul) whose weights are 0, 1, ..., reg_max - 1 (the expected value of a softmax)."""
    w = initializers.get(node.input[1]) if node.op_type in ("Conv", "MatMul") and len(node.input) > 1 else None
    if w is None or not ((len(w.dims) == 4 and w.dims[0] == 1) if node.op_type == "Conv" else
                         (len(w.dims) == 2 and w.dims[1] == 1)):
        return None
    from onnx import numpy_helper

    values = numpy_helper.to_array(w).reshape(-1)
    return values if np.array_equal(values, np.arange(values.size, dtype=values.dtype)) else None


def _is_dfl(node, initializers: dict) -> bool:
    """The DFL projection (by Ultralytics' node name or by its weights), which is decode, not a layer to quantize."""
    return (node.op_type == "Conv" and "dfl" in node.name.lower()) or _projection(node, initializers) is not None


def last_axis_dfl(model) -> int:
    """Rewrite Ultralytics' DFL decode in place to take its softmax over the last axis; the number of DFLs rewritten.

    Mirrors ``ultralytics.nn.modules.block.DFL.forward`` as exported: ``Reshape (b, 4, c1, a) -> Transpose(0, 2, 1,
    3) -> Softmax(axis=1) -> Conv 1x1 (weights 0..c1-1) -> Reshape (b, 4, a)``. It becomes ``Transpose(0, 1, 3, 2)
    -> Softmax(axis=-1) -> MatMul (c1, 1)``, whose ``(b, 4, a, 1)`` output the same Reshape takes: the same sums in the
    same order. Graphs without that pattern are left as they are.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    initializers = {t.name: t for t in graph.initializer}
    done = 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        transpose, after = producer.get(softmax.input[0]), consumers.get(softmax.output[0], [])
        if transpose is None or transpose.op_type != "Transpose" or len(after) != 1:
            continue
        conv = after[0]
        attrs = {a.name: helper.get_attribute_value(a) for n in (transpose, softmax) for a in n.attribute}
        if (conv.op_type != "Conv" or len(conv.input) != 2 or _projection(conv, initializers) is None
                or list(attrs.get("perm", [])) != [0, 2, 1, 3] or attrs.get("axis") != 1
                or len(consumers.get(transpose.output[0], [])) != 1):
            continue
        weight = numpy_helper.to_array(initializers[conv.input[1]]).reshape(-1, 1)
        projection = numpy_helper.from_array(weight, f"{conv.input[1]}/last_axis")
        graph.initializer.append(projection)
        del transpose.attribute[:], softmax.attribute[:], conv.attribute[:]
        transpose.attribute.append(helper.make_attribute("perm", [0, 1, 3, 2]))
        softmax.attribute.append(helper.make_attribute("axis", -1))
        old_weight = conv.input[1]
        conv.op_type, conv.name, conv.input[1] = "MatMul", f"{conv.name}/last_axis", projection.name
        if not any(old_weight in n.input for n in graph.node):
            graph.initializer.remove(initializers[old_weight])
        stale = {transpose.output[0], softmax.output[0], conv.output[0]}  # shapes changed: let inference redo them
        kept = [v for v in graph.value_info if v.name not in stale]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        done += 1
    return done


def upsample_as_concat(model) -> int:
    """Rewrite nearest-neighbour upsampling by integer factors as copies, in place; the number of Resizes rewritten.

    Mirrors ``torch.nn.Upsample(scale_factor=s, mode="nearest")`` as exported (``Resize``, mode nearest, asymmetric
    coordinates, floor: ``y[i] = x[i // s]``). In INT8, onnxruntime runs that Resize on uint8 NHWC data through its
    generic per-element path (~0.33 ms for YOLO11n's two at 320 px, 2 threads); ``Transpose to NHWC -> Unsqueeze ->
    Concat s copies along W, then along H -> Reshape -> Transpose back`` gives the same numbers as block copies
    (~0.05 ms; the transposes cancel against onnxruntime's own NHWC layout). Resizes of unknown shape are left.
    """
    from onnx import helper, numpy_helper, shape_inference

    graph = model.graph
    inferred = shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    inits = {i.name: i for i in graph.initializer}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    nodes, replaced, done = [], set(), 0
    for n in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        scales = numpy_helper.to_array(inits[n.input[2]]) if n.op_type == "Resize" and len(n.input) > 2 \
            and n.input[2] in inits else None
        shape = shapes.get(n.input[0], [])
        if (scales is None or len(n.input) > 3 or attrs.get("mode") != b"nearest"
                or attrs.get("coordinate_transformation_mode") != b"asymmetric" or attrs.get("nearest_mode") != b"floor"
                or len(shape) != 4 or not all(shape) or scales.shape != (4,) or list(scales[:2]) != [1, 1]
                or any(v != int(v) or v < 1 for v in scales[2:])):
            nodes.append(n)
            continue
        (b, c, h, w), (sh, sw) = shape, (int(v) for v in scales[2:])
        name, out = n.name or f"upsample{done}", n.output[0]
        target = numpy_helper.from_array(np.array([b, h * sh, w * sw, c], dtype=np.int64), f"{name}/shape")
        graph.initializer.append(target)
        if opset >= 13:  # Unsqueeze takes its axes as an input since opset 13
            axes = numpy_helper.from_array(np.array([2, 4], dtype=np.int64), f"{name}/axes")
            graph.initializer.append(axes)
            unsqueeze = helper.make_node("Unsqueeze", [f"{name}/nhwc", axes.name], [f"{name}/cells"], f"{name}/cells")
        else:
            unsqueeze = helper.make_node("Unsqueeze", [f"{name}/nhwc"], [f"{name}/cells"], f"{name}/cells", axes=[2, 4])
        nodes += [helper.make_node("Transpose", [n.input[0]], [f"{name}/nhwc"], f"{name}/nhwc", perm=[0, 2, 3, 1]),
                  unsqueeze,
                  helper.make_node("Concat", [f"{name}/cells"] * sw, [f"{name}/w"], f"{name}/w", axis=4),
                  helper.make_node("Concat", [f"{name}/w"] * sh, [f"{name}/hw"], f"{name}/hw", axis=2),
                  helper.make_node("Reshape", [f"{name}/hw", target.name], [f"{name}/up"], f"{name}/up"),
                  helper.make_node("Transpose", [f"{name}/up"], [out], f"{name}/nchw", perm=[0, 3, 1, 2])]
        replaced.add(n.input[2])
        done += 1
    if done:
        del graph.node[:]
        graph.node.extend(nodes)
        used = {t for n in graph.node for t in n.input}
        for init in [i for i in graph.initializer if i.name in replaced - used]:  # the Resize scales, if unshared
            graph.initializer.remove(init)
    return done


def float_nodes(model, keep_first_conv: bool = True, keep_output_convs: bool = True) -> list[str]:
    """Names of the nodes INT8 must leave in float: the decode tail, the head's output convs and the convs reading
    the image.

    The tail is every node from which no weighted op (conv, matmul; the DFL projection does not count) can be
    reached: what runs after the head's last convolutions. Those output convs (box and class logits: six 1x1 convs
    in YOLO11n) feed only the tail; in int8 they round the logits that the decode turns into scores and box edges
    (320 px, mAP50-95 drop with them in int8 -> in float: crops recipe 0.43 -> 0.15 points on crop_weed val, plain
    yolo11n 0.49 -> 0.65 on coco128).
    """
    graph = model.graph
    unnamed = [n for n in graph.node if not n.name]
    if unnamed:
        raise ValueError(f"The ONNX graph has {len(unnamed)} unnamed nodes; INT8 needs node names to keep the "
                         "decode in float. Export it with visionpeft.export (Ultralytics names every node).")
    initializers = {i.name: i for i in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    weighted = [n for n in graph.node if n.op_type in WEIGHTED_OPS and not _is_dfl(n, initializers)]
    upstream: set[str] = set()
    stack = [t for n in weighted for t in n.input if t in producer]
    while stack:
        node = producer[stack.pop()]
        if node.name not in upstream:
            upstream.add(node.name)
            stack += [t for t in node.input if t in producer]
    weighted_names = {n.name for n in weighted}
    keep = [n.name for n in graph.node if n.name not in upstream and n.name not in weighted_names]
    if keep_output_convs:
        tail = set(keep)
        consumers: dict[str, list[str]] = {}
        for n in graph.node:
            for t in n.input:
                consumers.setdefault(t, []).append(n.name)
        keep += [n.name for n in weighted if n.name not in tail
                 and all(c in tail for o in n.output for c in consumers.get(o, []))]
    if keep_first_conv:
        inputs = {i.name for i in graph.input}
        keep += [n.name for n in weighted if n.input and n.input[0] in inputs]
    return keep


def _quant_range(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def share_concat_params(model) -> int:
    """Give every quantized Concat's inputs the Concat output's scale and zero point, in place; tensors changed.

    onnxruntime fuses ``DQ -> Concat -> Q`` into ``QLinearConcat``, which requantizes every input whose scale or zero
    point differs from the output's through a scalar lookup table, on one thread; inputs that share the output's
    parameters are copied. A Concat's output range is the union of its inputs' ranges, so one scale covers all of
    them (each input loses at most the resolution the wider range costs). Tensors tied through several Concats (or a
    Split, whose outputs share its input's parameters by name) form one group with the union range. Biases of int32
    QDQ layers reading a changed tensor are requantized, since their scale must stay input scale x weight scale.
    YOLO11n, 320 px, with :func:`upsample_as_concat`: 2-thread INT8 latency 0.71-0.73x -> 0.64-0.68x FP32 on five
    models, mean mAP50-95 drop 0.42 points (``scripts/bench_edge.py --parts int8``; README "On the device").
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    zero_point = {n.input[1]: n.input[2] for n in graph.node
                  if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2}
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    for n in graph.node:
        if n.op_type != "Concat":
            continue
        dqs, after = [producer.get(t) for t in n.input], consumers.get(n.output[0], [])
        if (len(after) != 1 or after[0].op_type != "QuantizeLinear"
                or not all(d is not None and d.op_type == "DequantizeLinear" for d in dqs)):
            continue
        scales = [after[0].input[1]] + [d.input[1] for d in dqs]
        if not all(s in inits and zero_point.get(s) in inits and inits[s].dims == [] for s in scales):
            continue  # per-channel or computed parameters: not an activation this rewrite understands
        for s in scales[1:]:
            parent[root(s)] = root(scales[0])
    groups: dict[str, list[str]] = {}
    for s in parent:
        groups.setdefault(root(s), []).append(s)
    shared: dict[str, float] = {}
    for names in groups.values():
        zp = numpy_helper.to_array(inits[zero_point[names[0]]])
        qmin, qmax = _quant_range(zp.dtype)
        lo = hi = 0.0
        for s in names:  # the range each (scale, zero point) represents; every one includes 0
            scale, z = float(numpy_helper.to_array(inits[s])), int(numpy_helper.to_array(inits[zero_point[s]]))
            lo, hi = min(lo, (qmin - z) * scale), max(hi, (qmax - z) * scale)
        scale = np.float32((hi - lo) / (qmax - qmin))  # onnxruntime's compute_scale_zp for asymmetric ranges
        z = np.asarray(np.clip(round(qmin - lo / float(scale)), qmin, qmax), dtype=zp.dtype)
        for s in names:
            inits[s].CopyFrom(numpy_helper.from_array(np.asarray(scale), s))
            inits[zero_point[s]].CopyFrom(numpy_helper.from_array(z, zero_point[s]))
            shared[s] = float(scale)
    for n in graph.node:  # int32 biases: scale = input scale x weight scale (what QLinearConv assumes)
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(n.input) < 3:
            continue
        x, w, b = (producer.get(t) for t in n.input[:3])
        if x is None or x.op_type != "DequantizeLinear" or x.input[1] not in shared or b is None \
                or b.op_type != "DequantizeLinear" or w is None or w.op_type != "DequantizeLinear":
            continue
        codes, old_scale = inits[b.input[0]], inits[b.input[1]]
        bias = numpy_helper.to_array(codes).astype(np.float64) * numpy_helper.to_array(old_scale)
        new_scale = (shared[x.input[1]] * numpy_helper.to_array(inits[w.input[1]]).astype(np.float64))
        codes.CopyFrom(numpy_helper.from_array(np.round(bias / new_scale).astype(np.int32), codes.name))
        old_scale.CopyFrom(numpy_helper.from_array(new_scale.astype(np.float32), old_scale.name))
    return len(shared)
