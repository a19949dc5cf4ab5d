"""Editing ONNX graphs: every change a pass makes goes through :class:`OnnxEditor`.

Rules the editor enforces so that no pass has to remember them:

* a tensor another node also reads is never changed under that reader: a rewritten weight
  replaces the initializer's contents only when the rewritten node is its one reader, and is
  a new initializer otherwise (the old one is dropped by :meth:`OnnxEditor.cleanup` once
  nothing reads it);
* rewritten weights are computed in float64 and cast to the dtype of the tensor they replace
  (fp16 / bf16 models stay so);
* a graph output keeps its name, declared type and shape (symbolic dim names included) when
  the value behind it is replaced;
* a rewritten initializer keeps its doc string and metadata;
* IR version 3 files list every initializer as a graph input: new ones are listed too, unused
  ones are dropped with their input entry.

:func:`fold_affine` is the ONNX side of :func:`modelsurgeon.rewrite.affine.fold`: it folds a
composite per-channel affine map into a Conv / ConvTranspose / Gemm / MatMul.
"""

from __future__ import annotations

from typing import Any, Iterable


class OnnxEditor:
    def __init__(self, model: Any):
        self.model = model
        self.graph = model.graph
        self._names: set[str] | None = None

    # -- names ---------------------------------------------------------------------------------
    def _taken(self) -> set[str]:
        if self._names is None:
            names: set[str] = set()
            for v in list(self.graph.inputs) + list(self.graph.initializers.values()):
                if v.name:
                    names.add(v.name)
            for n in self.graph:
                if n.name:
                    names.add(n.name)
                for o in n.outputs:
                    if o.name:
                        names.add(o.name)
            self._names = names
        return self._names

    def unique_name(self, base: str) -> str:
        taken = self._taken()
        base = base or "ms"
        name, i = base, 1
        while name in taken:
            name = f"{base}_{i}"
            i += 1
        taken.add(name)
        return name

    # -- tensors -------------------------------------------------------------------------------
    def add_initializer(self, array: Any, base_name: str, dtype: Any = None, exact: bool = False) -> Any:
        """A new initializer holding ``array`` (cast to ``dtype`` if given), named ``base_name``
        made unique -- or exactly ``base_name`` when ``exact`` (the caller freed that name)."""
        import numpy as np
        import onnx_ir as ir

        arr = np.require(np.asarray(array).astype(dtype) if dtype is not None else np.asarray(array), requirements="C")
        if exact:
            name = base_name
            self._taken().add(name)
        else:
            name = self.unique_name(base_name)
        tensor = ir.Tensor(arr, name=name)
        value = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        if int(self.model.ir_version or 0) <= 3:
            self.graph.inputs.append(value)
        return value

    def write_tensor(self, node: Any, index: int, array: Any, base_name: str, dtype: Any = None) -> Any:
        """Give input ``index`` of ``node`` the contents ``array``: the initializer there is
        rewritten when this is its only reader, otherwise a new initializer is added (so a
        tensor another node also reads is never changed under it)."""
        import numpy as np
        import onnx_ir as ir

        old = node.inputs[index] if index < len(node.inputs) else None
        ir3 = int(self.model.ir_version or 0) <= 3  # every initializer is also listed as an input
        if (old is not None and old.is_initializer() and (ir3 or not old.is_graph_input()) and not old.is_graph_output()
                and list(old.uses()) == [(node, index)]):
            arr = np.require(np.asarray(array).astype(dtype) if dtype is not None else np.asarray(array), requirements="C")
            prev = old.const_value
            tensor = ir.Tensor(arr, name=old.name, doc_string=getattr(prev, "doc_string", None),
                               metadata_props=dict(getattr(prev, "metadata_props", None) or {}))
            old.const_value = tensor
            old.shape = ir.Shape(arr.shape)
            old.dtype = tensor.dtype
            return old
        value = self.add_initializer(array, base_name, dtype)
        self.set_input(node, index, value)
        return value

    @staticmethod
    def set_input(node: Any, index: int, value: Any) -> None:
        if len(node.inputs) <= index:
            node.resize_inputs(index + 1)
        node.replace_input_with(index, value)

    @staticmethod
    def set_attr(node: Any, name: str, value: Any) -> None:
        import onnx_ir as ir

        if isinstance(value, float):
            node.attributes[name] = ir.AttrFloat32(name, value)
        elif isinstance(value, int):
            node.attributes[name] = ir.AttrInt64(name, value)
        elif isinstance(value, (list, tuple)):
            node.attributes[name] = ir.AttrInt64s(name, [int(v) for v in value])
        elif isinstance(value, str):
            node.attributes[name] = ir.AttrString(name, value)
        else:  # pragma: no cover
            raise TypeError(f"unsupported attribute value {value!r}")

    # -- nodes and values ------------------------------------------------------------------------
    def add_node(self, op_type: str, inputs: list, after: Any, name: str, attributes: dict | None = None) -> Any:
        """A new default-domain node with one output, inserted after node ``after``."""
        import onnx_ir as ir

        node = ir.Node("", op_type, inputs, name=self.unique_name(name))
        for k, v in (attributes or {}).items():
            self.set_attr(node, k, v)
        node.outputs[0].name = self.unique_name(f"{node.name}_output")
        if after is not None:
            self.graph.insert_after(after, node)
        else:
            self.graph.insert_before(self.graph.node(0), node) if len(self.graph) else self.graph.append(node)
        return node

    def replace_value(self, old: Any, new: Any) -> Any:
        """Make every reader of ``old`` (and the graph output it may be) read ``new``.

        A graph output keeps its name and its declared type and shape: ``new`` takes them, or
        an ``Identity`` carries them when ``new`` is itself a graph input, output or
        initializer. Returns the value now standing in for ``old``.
        """
        if old is new:
            return new
        if not old.is_graph_output():
            old.replace_all_uses_with(new)
            return new
        if new.is_graph_input() or new.is_graph_output() or new.is_initializer():
            ident = self.add_node("Identity", [new], new.producer(), f"{old.name}_identity")
            new = ident.outputs[0]
        name = old.name
        if old.type is not None:  # the declared interface, not what inference says about ``new``
            new.type = old.type
        if old.shape is not None:
            new.shape = old.shape
        old.name = self.unique_name(f"{name}_replaced")
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        new.name = name
        return new

    def replace_with_constant(self, value: Any, array: Any) -> Any:
        """Replace a computed value by an initializer holding ``array`` that takes its name (the
        computed value is renamed, then dropped with the nodes computing it)."""
        name = value.name or self.unique_name("constant")
        value.name = self.unique_name(f"{name}_computed")
        return self.replace_value(value, self.add_initializer(array, name, exact=True))

    def remove_nodes(self, nodes: Iterable[Any]) -> None:
        """Remove nodes whose outputs nobody outside ``nodes`` reads any more."""
        nodes = list({id(n): n for n in nodes}.values())
        if nodes:
            self.graph.remove(nodes, safe=True)

    # -- after a pass --------------------------------------------------------------------------
    def cleanup(self) -> int:
        """Remove dead nodes and unused initializers, then sort topologically; returns the
        number of nodes + initializers removed. Graph inputs and outputs are kept, except
        IR-version-3 initializer inputs nothing reads any more."""
        import onnx_ir as ir

        before = len(self.graph) + len(self.graph.initializers)
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(self.model)
        if int(self.model.ir_version or 0) <= 3:
            for v in list(self.graph.inputs):
                if v.is_initializer() and not v.uses() and not v.is_graph_output():
                    self.graph.inputs.remove(v)
                    self.graph.initializers.pop(v.name)
        self.graph.sort()
        self._names = None
        return before - len(self.graph) - len(self.graph.initializers)


def fold_affine(editor: OnnxEditor, unit: Any, steps: list) -> dict:
    """Fold ``steps`` (per-channel affine nodes after ``unit``) into ``unit``'s weights and
    remove them; the layer's output takes the place of the last step's output.

    Returns report data: whether a bias was added and whether the weight was shared.
    """
    import numpy as np

    from ..match.onnx import to_f64
    from .affine import fold

    total = steps[0].affine
    for s in steps[1:]:
        total = total.then(s.affine)
    scale, shift = total.scale, total.shift
    node = unit.node
    w_dtype = unit.weight_array.dtype
    shared = len(unit.weight.uses()) > 1
    base = unit.weight.name or f"{unit.label}_weight"
    bias_added = False
    if unit.kind in ("conv", "conv_transpose"):
        b = None if unit.bias_array is None else to_f64(unit.bias_array)
        w, b = fold(to_f64(unit.weight_array), b, scale, shift, unit.kind, unit.groups)
        editor.write_tensor(node, 1, w.numpy(), base, w_dtype)
        bias_added = unit.bias is None
        b_name = unit.bias.name if unit.bias is not None and unit.bias.name else f"{unit.label}_bias"
        b_dtype = unit.bias_array.dtype if unit.bias_array is not None else w_dtype
        editor.write_tensor(node, 2, b.numpy(), b_name, b_dtype)
        result = node.outputs[0]
    elif unit.kind == "gemm":
        w = to_f64(unit.weight_array)
        w_lin = w if unit.trans_b else w.T
        w_new, _ = fold(w_lin, None, scale, shift, "linear")
        w_new = w_new if unit.trans_b else w_new.T
        editor.write_tensor(node, 1, w_new.numpy(), base, w_dtype)
        s, t = scale.numpy(), shift.numpy()
        if unit.bias_array is None:
            c = t
            bias_added = True
        else:
            c = unit.beta * unit.bias_array.astype(np.float64) * s + t
        c_name = unit.bias.name if unit.bias is not None and unit.bias.name else f"{unit.label}_bias"
        c_dtype = unit.bias_array.dtype if unit.bias_array is not None else w_dtype
        editor.write_tensor(node, 2, c, c_name, c_dtype)
        editor.set_attr(node, "beta", 1.0)
        result = node.outputs[0]
    else:  # matmul: B (K, N) scaled per column; the shift becomes one Add
        w_new, _ = fold(to_f64(unit.weight_array).T, None, scale, shift, "linear")
        editor.write_tensor(node, 1, w_new.T.numpy(), base, w_dtype)
        result = node.outputs[0]
        had_add = any(s.node.op_type in ("Add", "Sub") for s in steps)
        if had_add or bool((shift != 0).any()):
            shape = [1] * (unit.rank - 1) + [unit.out_channels] if unit.rank > 1 else [unit.out_channels]
            bias = editor.add_initializer(shift.numpy().reshape(shape), f"{unit.label}_bias", w_dtype)
            add = editor.add_node("Add", [result, bias], node, f"{unit.label}_bias_add")
            result = add.outputs[0]
            bias_added = not had_add
    ins = [s.inp for s in steps]
    if all(i is None for i in ins) or ins == [node.outputs[0]] + [s.out for s in steps[:-1]]:
        editor.replace_value(steps[-1].out, result)
    else:  # reshapes in between (LeViT): each step's readers read its input, the reshapes stay
        for s in reversed(steps):
            editor.replace_value(s.out, s.inp)
        if result is not node.outputs[0]:  # a MatMul's new bias Add
            for use in list(node.outputs[0].uses()):
                if use.node is not result.producer():
                    use.node.replace_input_with(use.idx, result)
    editor.remove_nodes([s.node for s in steps])
    return {"bias_added": bias_added, "weight_shared": shared}
