"""localize inside an ONNX graph: every module's output as an extra graph output.

The torch.onnx dynamo exporter records, on every node, the module scopes it came from
(`pkg.torch.onnx.name_scopes`, e.g. ['', 'net', 'net.down_blocks.0', 'net.down_blocks.0.resnets.0',
..., 'conv2d_3']). The output of the last floating-point node inside a module's scope is taken as
that module's output (Polygraphy's "mark all", grouped by module); a tapped copy of the graph
returns all of them, recorded under the reference's module names in graph order.
"""
from __future__ import annotations

import ast
import contextlib
import os
from pathlib import Path

import torch

MODEL_FILE = "model.onnx"
TAPPED_FILE = "tapped.onnx"
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
ROOT = "net"  # the exported wrapper's attribute holding the reference module


def module_outputs(model) -> dict[str, str]:
    """{value name: module name}: the output of the last node inside each module's scope, in graph order
    (module names as the wrapped reference spells them, without the wrapper's `net.`)."""
    import onnx

    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    types = {v.name: v.type.tensor_type for v in list(model.graph.value_info) + list(model.graph.output)}

    def activation(value: str) -> bool:  # not a shape computation (int64 scalars) inside the scope
        t = types.get(value)
        return t is not None and t.elem_type in floating and len(t.shape.dim) > 0

    last: dict[str, str] = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if SCOPES_KEY not in meta or not node.output or not activation(node.output[0]):
            continue
        try:
            scopes = ast.literal_eval(meta[SCOPES_KEY])
        except (ValueError, SyntaxError):
            continue
        for scope in scopes[:-1]:  # the last entry names the op, not a module
            if scope.startswith(ROOT + "."):
                last[scope[len(ROOT) + 1:]] = node.output[0]
    by_value: dict[str, str] = {}
    order = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    for module_name, value in sorted(last.items(), key=lambda kv: order[kv[1]]):
        by_value.setdefault(value, module_name)  # a value ending two nested modules: the outer one's name
        # (the inner layer of the pair is then not tapped; localize still pairs the outer)
    return by_value


def tapped_model(folder: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the graph whose outputs also hold every module's output (beside model.onnx, so that
    external weights resolve), and {value name: reference module name}."""
    import onnx

    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    names = module_outputs(model)
    have = {o.name for o in model.graph.output}
    for value in names:
        if value not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=value))
    path = folder / TAPPED_FILE
    tmp = folder / (TAPPED_FILE + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return path, names


class OnnxTap:
    """`Built.tap`: while active, the graphs run their tapped copies and record every module output."""

    def __init__(self, graphs: list):  # onnxrt._Graph objects
        self.graphs = graphs
        self.names = {}  # reference module name -> the ONNX value that holds its output
        for g in graphs:
            _path, by_value = g.tapped()
            self.names.update({m: v for v, m in by_value.items()})

    @contextlib.contextmanager
    def __call__(self):
        seen: dict[str, torch.Tensor] = {}
        for g in self.graphs:
            g.recording = seen
        try:
            yield seen
        finally:
            for g in self.graphs:
                g.recording = None


class LazyTap:
    """An OnnxTap built on first use (writing the tapped graph costs a load and a save)."""

    def __init__(self, graphs):
        self.graphs, self._tap = graphs, None

    @property
    def names(self) -> dict[str, str]:
        return self.tap().names

    def tap(self) -> OnnxTap:
        if self._tap is None:
            self._tap = OnnxTap(self.graphs)
        return self._tap

    def __call__(self):
        return self.tap()()
