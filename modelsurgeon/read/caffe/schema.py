"""The part of ``caffe.proto`` modelsurgeon reads, as a protobuf schema built at run time.

Field names, numbers, types and defaults are Caffe's (BVLC ``caffe.proto``; ``permute_param``,
``upsample_param`` and ``interp_param`` as the SSD, YOLO and PSPNet forks declare them). The
messages are made with ``google.protobuf`` (a dependency of ``onnx``) from descriptors built
here, so parsing -- binary and text format -- is protobuf's own: unknown fields of a
``.caffemodel`` (forks' layer parameters) are skipped and kept, ``.prototxt`` text follows the
full text-format grammar. Only messages and fields listed here are known.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

# message -> [(field, number, type, label, default)]; label "r" repeated, "p" repeated packed,
# "" optional. Types: scalar names, or another message / enum of this schema.
MESSAGES: dict[str, list[tuple]] = {
    "BlobShape": [("dim", 1, "int64", "p", None)],
    "BlobProto": [
        ("shape", 7, "BlobShape", "", None), ("data", 5, "float", "p", None), ("diff", 6, "float", "p", None),
        ("double_data", 8, "double", "p", None), ("double_diff", 9, "double", "p", None),
        ("raw_data_type", 10, "int32", "", None), ("raw_data", 12, "bytes", "", None),
        ("num", 1, "int32", "", 0), ("channels", 2, "int32", "", 0), ("height", 3, "int32", "", 0),
        ("width", 4, "int32", "", 0)],
    "FillerParameter": [
        ("type", 1, "string", "", "constant"), ("value", 2, "float", "", 0), ("min", 3, "float", "", 0),
        ("max", 4, "float", "", 1), ("mean", 5, "float", "", 0), ("std", 6, "float", "", 1),
        ("sparse", 7, "int32", "", -1), ("variance_norm", 8, "int32", "", 0)],
    "NetState": [("phase", 1, "Phase", "", "TEST"), ("level", 2, "int32", "", 0), ("stage", 3, "string", "r", None)],
    "NetStateRule": [
        ("phase", 1, "Phase", "", None), ("min_level", 2, "int32", "", None), ("max_level", 3, "int32", "", None),
        ("stage", 4, "string", "r", None), ("not_stage", 5, "string", "r", None)],
    "ParamSpec": [("name", 1, "string", "", None), ("share_mode", 2, "int32", "", None),
                  ("lr_mult", 3, "float", "", 1.0), ("decay_mult", 4, "float", "", 1.0)],
    "NetParameter": [
        ("name", 1, "string", "", None), ("input", 3, "string", "r", None), ("input_shape", 8, "BlobShape", "r", None),
        ("input_dim", 4, "int32", "r", None), ("force_backward", 5, "bool", "", False),
        ("state", 6, "NetState", "", None), ("debug_info", 7, "bool", "", False),
        ("layer", 100, "LayerParameter", "r", None), ("layers", 2, "V1LayerParameter", "r", None)],
    "V1LayerParameter": [("bottom", 2, "string", "r", None), ("top", 3, "string", "r", None),
                         ("name", 4, "string", "", None), ("type", 5, "int32", "", None),
                         ("blobs", 6, "BlobProto", "r", None)],
    "ConvolutionParameter": [
        ("num_output", 1, "uint32", "", None), ("bias_term", 2, "bool", "", True), ("pad", 3, "uint32", "r", None),
        ("kernel_size", 4, "uint32", "r", None), ("stride", 6, "uint32", "r", None),
        ("dilation", 18, "uint32", "r", None), ("pad_h", 9, "uint32", "", 0), ("pad_w", 10, "uint32", "", 0),
        ("kernel_h", 11, "uint32", "", None), ("kernel_w", 12, "uint32", "", None),
        ("stride_h", 13, "uint32", "", None), ("stride_w", 14, "uint32", "", None),
        ("group", 5, "uint32", "", 1), ("weight_filler", 7, "FillerParameter", "", None),
        ("bias_filler", 8, "FillerParameter", "", None), ("engine", 15, "Engine", "", "DEFAULT"),
        ("axis", 16, "int32", "", 1), ("force_nd_im2col", 17, "bool", "", False)],
    "BatchNormParameter": [("use_global_stats", 1, "bool", "", None), ("moving_average_fraction", 2, "float", "", 0.999),
                           ("eps", 3, "float", "", 1e-5), ("scale_bias", 7, "bool", "", False)],
    "ScaleParameter": [("axis", 1, "int32", "", 1), ("num_axes", 2, "int32", "", 1),
                       ("filler", 3, "FillerParameter", "", None), ("bias_term", 4, "bool", "", False),
                       ("bias_filler", 5, "FillerParameter", "", None)],
    "BiasParameter": [("axis", 1, "int32", "", 1), ("num_axes", 2, "int32", "", 1),
                      ("filler", 3, "FillerParameter", "", None)],
    "ReLUParameter": [("negative_slope", 1, "float", "", 0.0), ("engine", 2, "Engine", "", "DEFAULT")],
    "PReLUParameter": [("filler", 1, "FillerParameter", "", None), ("channel_shared", 2, "bool", "", False)],
    "PoolingParameter": [
        ("pool", 1, "PoolMethod", "", "MAX"), ("pad", 4, "uint32", "", 0), ("pad_h", 9, "uint32", "", 0),
        ("pad_w", 10, "uint32", "", 0), ("kernel_size", 2, "uint32", "", None), ("kernel_h", 5, "uint32", "", None),
        ("kernel_w", 6, "uint32", "", None), ("stride", 3, "uint32", "", 1), ("stride_h", 7, "uint32", "", None),
        ("stride_w", 8, "uint32", "", None), ("engine", 11, "Engine", "", "DEFAULT"),
        ("global_pooling", 12, "bool", "", False), ("round_mode", 13, "RoundMode", "", "CEIL")],
    "EltwiseParameter": [("operation", 1, "EltwiseOp", "", "SUM"), ("coeff", 2, "float", "r", None),
                         ("stable_prod_grad", 3, "bool", "", True)],
    "ConcatParameter": [("axis", 2, "int32", "", 1), ("concat_dim", 1, "uint32", "", 1)],
    "InnerProductParameter": [
        ("num_output", 1, "uint32", "", None), ("bias_term", 2, "bool", "", True),
        ("weight_filler", 3, "FillerParameter", "", None), ("bias_filler", 4, "FillerParameter", "", None),
        ("axis", 5, "int32", "", 1), ("transpose", 6, "bool", "", False)],
    "SoftmaxParameter": [("engine", 1, "Engine", "", "DEFAULT"), ("axis", 2, "int32", "", 1)],
    "DropoutParameter": [("dropout_ratio", 1, "float", "", 0.5), ("scale_train", 2, "bool", "", True)],
    "FlattenParameter": [("axis", 1, "int32", "", 1), ("end_axis", 2, "int32", "", -1)],
    "ReshapeParameter": [("shape", 1, "BlobShape", "", None), ("axis", 2, "int32", "", 0),
                         ("num_axes", 3, "int32", "", -1)],
    "SliceParameter": [("axis", 3, "int32", "", 1), ("slice_point", 2, "uint32", "r", None),
                       ("slice_dim", 1, "uint32", "", 1)],
    "SigmoidParameter": [("engine", 1, "Engine", "", "DEFAULT")],
    "TanHParameter": [("engine", 1, "Engine", "", "DEFAULT")],
    "ELUParameter": [("alpha", 1, "float", "", 1.0)],
    "PowerParameter": [("power", 1, "float", "", 1.0), ("scale", 2, "float", "", 1.0), ("shift", 3, "float", "", 0.0)],
    "LRNParameter": [("local_size", 1, "uint32", "", 5), ("alpha", 2, "float", "", 1.0), ("beta", 3, "float", "", 0.75),
                     ("norm_region", 4, "NormRegion", "", "ACROSS_CHANNELS"), ("k", 5, "float", "", 1.0),
                     ("engine", 6, "Engine", "", "DEFAULT")],
    "InputParameter": [("shape", 1, "BlobShape", "r", None)],
    "PermuteParameter": [("order", 1, "uint32", "r", None)],
    "UpsampleParameter": [("scale", 1, "uint32", "", 1)],
    "InterpParameter": [("height", 1, "int32", "", 0), ("width", 2, "int32", "", 0),
                        ("zoom_factor", 3, "int32", "", 1), ("shrink_factor", 4, "int32", "", 1),
                        ("pad_beg", 5, "int32", "", 0), ("pad_end", 6, "int32", "", 0)],
}

LAYER_FIELDS: list[tuple] = [
    ("name", 1, "string", "", None), ("type", 2, "string", "", None), ("bottom", 3, "string", "r", None),
    ("top", 4, "string", "r", None), ("phase", 10, "Phase", "", None), ("loss_weight", 5, "float", "r", None),
    ("param", 6, "ParamSpec", "r", None), ("blobs", 7, "BlobProto", "r", None),
    ("propagate_down", 11, "bool", "r", None), ("include", 8, "NetStateRule", "r", None),
    ("exclude", 9, "NetStateRule", "r", None),
    ("batch_norm_param", 139, "BatchNormParameter", "", None), ("bias_param", 141, "BiasParameter", "", None),
    ("concat_param", 104, "ConcatParameter", "", None), ("convolution_param", 106, "ConvolutionParameter", "", None),
    ("dropout_param", 108, "DropoutParameter", "", None), ("eltwise_param", 110, "EltwiseParameter", "", None),
    ("elu_param", 140, "ELUParameter", "", None), ("flatten_param", 135, "FlattenParameter", "", None),
    ("inner_product_param", 117, "InnerProductParameter", "", None), ("input_param", 143, "InputParameter", "", None),
    ("lrn_param", 118, "LRNParameter", "", None), ("pooling_param", 121, "PoolingParameter", "", None),
    ("power_param", 122, "PowerParameter", "", None), ("prelu_param", 131, "PReLUParameter", "", None),
    ("relu_param", 123, "ReLUParameter", "", None), ("reshape_param", 133, "ReshapeParameter", "", None),
    ("scale_param", 142, "ScaleParameter", "", None), ("sigmoid_param", 124, "SigmoidParameter", "", None),
    ("softmax_param", 125, "SoftmaxParameter", "", None), ("slice_param", 126, "SliceParameter", "", None),
    ("tanh_param", 127, "TanHParameter", "", None), ("permute_param", 202, "PermuteParameter", "", None),
    ("upsample_param", 149, "UpsampleParameter", "", None), ("interp_param", 10143, "InterpParameter", "", None),
]
MESSAGES["LayerParameter"] = LAYER_FIELDS

ENUMS: dict[str, list[tuple[str, int]]] = {
    "Phase": [("TRAIN", 0), ("TEST", 1)],
    "Engine": [("DEFAULT", 0), ("CAFFE", 1), ("CUDNN", 2)],
    "PoolMethod": [("MAX", 0), ("AVE", 1), ("STOCHASTIC", 2)],
    "RoundMode": [("CEIL", 0), ("FLOOR", 1)],
    "EltwiseOp": [("PROD", 0), ("SUM", 1), ("MAX", 2)],
    "NormRegion": [("ACROSS_CHANNELS", 0), ("WITHIN_CHANNEL", 1)],
}

PACKAGE = "modelsurgeon_caffe"
_SCALARS = {"double": 1, "float": 2, "int64": 3, "uint64": 4, "int32": 5, "bool": 8, "string": 9, "bytes": 12,
            "uint32": 13}


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@lru_cache(maxsize=1)
def classes() -> dict[str, Any]:
    """Message classes by name (``NetParameter``, ``LayerParameter``, ``BlobProto`` ...)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name=f"{PACKAGE}.proto", package=PACKAGE, syntax="proto2")
    top = fd.enum_type.add(name="Phase")  # a file-level enum in caffe.proto; the others are nested
    for vname, number in ENUMS["Phase"]:
        top.value.add(name=vname, number=number)
    for mname, fields in MESSAGES.items():
        m = fd.message_type.add(name=mname)
        nested: set[str] = set()
        for fname, number, ftype, label, default in fields:
            f = m.field.add(name=fname, number=number)
            f.label = F.LABEL_REPEATED if label in ("r", "p") else F.LABEL_OPTIONAL
            if label == "p":
                f.options.packed = True
            if ftype in _SCALARS:
                f.type = _SCALARS[ftype]
            elif ftype in ENUMS:
                f.type = F.TYPE_ENUM
                if ftype == "Phase":
                    f.type_name = f".{PACKAGE}.Phase"
                else:
                    f.type_name = f".{PACKAGE}.{mname}.{ftype}"
                    if ftype not in nested:
                        e = m.enum_type.add(name=ftype)
                        for vname, value in ENUMS[ftype]:
                            e.value.add(name=vname, number=value)
                        nested.add(ftype)
            else:
                f.type = F.TYPE_MESSAGE
                f.type_name = f".{PACKAGE}.{ftype}"
            if default is not None and label == "":
                f.default_value = _default_text(default)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
            for name in MESSAGES}
