"""`tlcore.fuse(model)`: swap conv → BN (→ residual add) (→ ReLU) chains for fused kernels.

torchvision ResNets (BasicBlock, Bottleneck, the stem) are rewritten by handlers that
keep the model's class and module names. In any other module, Conv2d → BatchNorm2d
(→ add) (→ ReLU) chains are found in its torch.fx graph. A chain without a residual add is
fused in place: the conv becomes the fused module and the BN and ReLU modules nn.Identity,
so the module keeps its class, forward, methods and attributes (a Sequential stays one,
with its indices). Fusing a residual add needs the traced forward: that module becomes an
fx.GraphModule, but only where nothing else would be lost (graph_rewrite_loses); elsewhere
its conv and BN fuse without the add. A conv that cannot be fused stays stock, and
print(model) says why.

Which modules another forward also calls (those must stay as they are) comes from the traced
forwards, and from the code of forwards torch.fx cannot follow (untraced_reach).

torch.fx records `a += b` as `a + b`: a forward that adds in place into a tensor it reads
again afterwards traces into a different function, fused or not. torchvision's blocks
(`out += identity; out = relu(out)`) are not affected, and are not traced anyway.
"""
import ast
import copy
import inspect
import operator
import textwrap
import warnings
import weakref
from collections import Counter, defaultdict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from tlcore.nn.blocks import FusedResidualBlock
from tlcore.nn.conv import (TRAIN_MODE_ERROR, FusedConv2dBNReLU, fusion_unsupported_reason, is_frozen_batchnorm,
                            mark_stock)

_RELU_CALLS = {F.relu, torch.relu, torch.relu_, F.relu_}
_ADD_CALLS = {operator.add, operator.iadd, torch.add}
_SHARED = "called from more than one place (fusing would change the other calls)"


def require_eval(model: nn.Module, why: str) -> None:
    """Raise ValueError naming the first module of `model` in train mode; `why` starts the message."""
    training = next((name or type(model).__name__ for name, m in model.named_modules() if m.training), None)
    if training is not None:
        raise ValueError(f"{why}, but {training!r} is in train mode: call model.eval() after the last change to the "
                         "model (a module assigned after eval() starts in train mode)")


def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return `model` with its conv + BN (+ residual) (+ ReLU) chains fused (inference only).

    model: an nn.Module in eval mode (BN running statistics are folded), fp16/bf16/fp32.
    inplace: rewrite `model` itself instead of a deep copy.
    The result computes the same function within the dtype's tolerance; inputs of any
    memory format work, channels_last is fastest. Modules keep their class, but for those whose
    residual add is fused through torch.fx, which come back as fx.GraphModules (module docstring).
    While a fused module is in train mode, a call raises before the normalization layers the result
    kept (stock BatchNorms, say) update their running statistics.
    """
    fused = fuse_chains(model, inplace)
    fused_modules = [m for m in fused.modules() if isinstance(m, FusedConv2dBNReLU)]
    if fused_modules:
        refuse = RefuseTrainMode(fused_modules)
        for norm in fused.modules():
            if isinstance(norm, nn.modules.batchnorm._NormBase):  # (BatchNorm, InstanceNorm: running statistics)
                norm.register_forward_pre_hook(refuse)
    return fused


def fuse_chains(model: nn.Module, inplace: bool) -> nn.Module:
    """fuse() without the train-mode check on the result's calls (tlcore.quantize builds its int8 model,
    which has its own rules, from this one)."""
    require_eval(model, "tlcore.fuse folds BatchNorm running statistics and returns an inference model")
    if not inplace:
        model = copy.deepcopy(model)
    _remove_train_mode_refusals(model)  # (a model fused before: fuse adds them again, for its fused modules)
    hooked = {name: m for name, m in model.named_modules() if has_hooks(m)}
    fused = _Fuser(model).tree(model).eval()  # new modules start in train mode
    kept = {id(m) for m in fused.modules()}
    dropped = [name or type(model).__name__ for name, m in hooked.items() if id(m) not in kept]
    if dropped:
        warnings.warn(f"tlcore.fuse: the hooks on {dropped} are gone with those modules, which were fused into "
                      "others: register them on the fused model", stacklevel=3)
    return fused


class RefuseTrainMode:
    """The forward pre-hook of the normalization layers a fused model keeps: a layer in train mode raises
    while any of the model's fused modules is in train mode, which would raise only when the call reaches
    it, after this layer had updated its running statistics. (One hook on each such layer, not one on the
    model: torch 2.6's strict torch.export fails on a model with a forward pre-hook.)

    It holds the fused modules by weak reference: a fused module the user replaces is not kept alive, and
    a head copied alone does not keep a copy of the backbone. Copies and pickles of the model refer to
    their own fused modules (__reduce__; a head pickled alone does carry them).
    """

    def __init__(self, fused_modules: list[nn.Module]):
        self._fused = tuple(weakref.ref(m) for m in fused_modules)

    def fused_modules(self) -> list[nn.Module]:
        return [m for m in (ref() for ref in self._fused) if m is not None]

    def __call__(self, norm: nn.Module, args) -> None:
        if norm.training and any(m.training for m in self.fused_modules()):
            raise RuntimeError(TRAIN_MODE_ERROR)

    def __reduce__(self):
        return RefuseTrainMode, (self.fused_modules(),)


def _remove_train_mode_refusals(model: nn.Module) -> None:
    for module in model.modules():
        for key in [k for k, hook in module._forward_pre_hooks.items() if isinstance(hook, RefuseTrainMode)]:
            del module._forward_pre_hooks[key]


def hook_dicts(module: nn.Module) -> tuple[dict, ...]:
    """module's own forward and backward hooks (not the global ones), as nn.Module keeps them."""
    return (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)


def has_hooks(module: nn.Module) -> bool:
    return any(hook_dicts(module))


class _OneLevelTracer(fx.Tracer):
    """Traces a module's own forward and keeps every child module as a call."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return True


def _trace(module: nn.Module) -> fx.Graph:
    return _OneLevelTracer().trace(module)


def untraced_reason(module: nn.Module) -> tuple[str, fx.Graph | None]:
    """(why torch.fx cannot stand for module's forward, or ''; its traced graph where it can)."""
    signature = inspect.signature(module.forward)
    if any(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
           for p in signature.parameters.values()):
        # A proxy is never None: torch.fx would follow one branch of `if arg is None` whatever the call.
        return f"{type(module).__name__}.forward has optional arguments, which torch.fx cannot follow", None
    try:
        return "", _trace(module)
    except Exception as error:  # noqa: BLE001 - any tracing failure means: leave it stock
        return f"{type(module).__name__} does not trace with torch.fx ({type(error).__name__})", None


def _children_reached_within(cls: type) -> set[str] | None:
    """The children of a `cls` module whose insides its methods (not __init__) may reach: those its code
    uses other than by calling them (`self.body[1]`, `self.block.conv`, `self.child.method()`,
    `b = self.block`); None for all of them (`self` used otherwise, e.g. `self.modules()`; no source)."""
    reached: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.nn.") or klass is object:
            continue  # (torch's containers and nn.Module call their children only)
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            return None
        methods = [node for node in tree.body[0].body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                   and node.name != "__init__"]  # (construction code: not called at run time)
        for method in methods:
            if not method.args.args:
                continue
            self_name = method.args.args[0].arg  # ("self", by convention only)
            parents = {child: node for node in ast.walk(method) for child in ast.iter_child_nodes(node)}
            for node in ast.walk(method):
                if not (isinstance(node, ast.Name) and node.id == self_name):
                    continue
                use = parents[node]
                if not isinstance(use, ast.Attribute):
                    return None  # (self passed on, or used as a whole)
                called = isinstance(parents.get(use), ast.Call) and parents[use].func is use
                if not called:  # (self.child(...) only calls the child)
                    reached.add(use.attr)
    return reached


def untraced_reach(module: nn.Module) -> list[nn.Module]:
    """The modules below module's children that code torch.fx cannot follow may call directly: its
    forward's (where it does not trace) and its forward hooks'. All below the children its class's code
    uses other than by calling them (_children_reached_within), all below every child for hooks."""
    names = None if any(hook_dicts(module)[:2]) else _children_reached_within(type(module))
    return [m for name, child in module.named_children() if names is None or name in names
            for m in list(child.modules())[1:]]


def _callers(model: nn.Module) -> dict[int, Counter]:
    """For each module called in the forwards of model's tree (by id): how many calls each caller's
    forward makes (by the caller's id). A forward torch.fx cannot follow counts one call of each of
    its children and of what its code may reach below them, and a module's forward hooks one call of
    what they may reach (untraced_reach)."""
    callers = defaultdict(Counter)
    for module in model.modules():
        if next(module.children(), None) is None:
            continue
        reason, graph = untraced_reason(module)
        if reason or any(hook_dicts(module)[:2]):  # (forward hooks may call anything below)
            for callee in untraced_reach(module):
                callers[id(callee)][id(module)] += 1
        if reason:
            for callee in module.children():
                callers[id(callee)][id(module)] += 1
            continue
        for node in graph.nodes:
            if node.op == "call_module":
                callers[id(module.get_submodule(node.target))][id(module)] += 1
    return callers


class _Chain(NamedTuple):
    """A conv → BN (→ add residual) (→ ReLU) chain in a module's fx graph."""

    nodes: list[fx.Node]  # the conv's, the BN's, then the add's and the ReLU's where they are absorbed
    residual: fx.Node | None  # the add's other operand
    relu: bool


class _Fuser:
    """One fuse() pass over a model; knows which modules are shared between call sites."""

    def __init__(self, model: nn.Module):
        self.callers = _callers(model)
        # A conv called twice, or called by a parent as well as by its own block, must stay a
        # plain conv for the other callers.
        self.shared = {callee for callee, calls in self.callers.items() if sum(calls.values()) > 1}

    def reason(self, conv: nn.Module, bn: nn.Module) -> str:
        """Why conv → bn cannot be fused here ('' if it can)."""
        return _SHARED if id(conv) in self.shared else fusion_unsupported_reason(conv, bn)

    def called_elsewhere(self, module: nn.Module, owner: nn.Module) -> bool:
        """Whether a forward other than owner's calls `module`: fusing it away would change those
        calls, or break them (a fused model drops the modules it folded)."""
        return any(caller != id(owner) for caller in self.callers[id(module)])

    def called_once(self, module: nn.Module) -> bool:
        """Whether exactly one call, in all of the model's forwards, calls `module`: then nn.Identity
        may stand in for it."""
        return sum(self.callers[id(module)].values()) == 1

    def used_outside(self, owner: nn.Module, names: tuple[str, ...]) -> str:
        """Why the modules `names` of owner (a ResNet block or stem, or its downsample) cannot be
        fused away ('' if none is called elsewhere)."""
        for name in names:
            module = getattr(owner, name, None)
            if module is not None and self.called_elsewhere(module, owner):
                return f"its {name} is also called from outside it (fusing would change those calls)"
        return ""

    def tree(self, module: nn.Module) -> nn.Module:
        """Fuse inside `module` bottom-up; returns the module or its replacement."""
        handler = self.handler_for(module)
        if handler is not None:
            return handler(module)
        for name, child in module.named_children():
            replacement = self.tree(child)
            if replacement is not child:
                setattr(module, name, replacement)
        if _has_conv_bn_children(module):
            return self.graph(module)
        return module

    def fused_or_stock(self, conv, bn, relu: bool) -> nn.Module:
        """A fused module, or stock conv → bn (→ ReLU) with the reason recorded on the conv."""
        reason = self.reason(conv, bn)
        if not reason:
            return FusedConv2dBNReLU.from_modules(conv, bn, relu=relu)
        mark_stock(conv, reason)
        return nn.Sequential(conv, bn, nn.ReLU(inplace=True)) if relu else nn.Sequential(conv, bn)

    # ---- torchvision ResNets --------------------------------------------------------------------

    def handler_for(self, module: nn.Module):
        try:
            from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
        except ImportError:
            return None
        kind = type(module)  # exact types: a subclass may have changed forward
        if id(module) in self.shared:
            return None
        if kind in (BasicBlock, Bottleneck):
            return self.resnet_block
        if kind is ResNet:
            return self.resnet
        return None

    def resnet_block(self, block: nn.Module) -> nn.Module:
        """BasicBlock (conv1, conv2) or Bottleneck (conv1, conv2, conv3) → FusedResidualBlock."""
        convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
        bns = [block.bn1, block.bn2] + ([block.bn3] if hasattr(block, "bn3") else [])
        used_outside = self.used_outside(block, ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample"))
        if not used_outside and isinstance(block.downsample, nn.Sequential):
            used_outside = self.used_outside(block.downsample, ("0", "1"))
        if used_outside:
            for conv in convs:
                mark_stock(conv, f"the block: {used_outside}")
            return block
        reason = _not_relu(block.relu) or self.reason(convs[-1], bns[-1])
        if reason:  # nothing would absorb the residual add: the block stays as it is
            for conv in convs:
                mark_stock(conv, f"{'this' if conv is convs[-1] else 'the block’s last'} conv: {reason}")
            return block
        body = nn.Sequential(*[self.fused_or_stock(conv, bn, relu=True) for conv, bn in zip(convs[:-1], bns[:-1])])
        last = FusedConv2dBNReLU.from_modules(convs[-1], bns[-1], relu=True, residual=True)
        downsample = block.downsample
        if isinstance(downsample, nn.Sequential) and len(downsample) == 2:
            downsample = self.fused_or_stock(downsample[0], downsample[1], relu=False)
        elif downsample is not None:
            downsample = self.tree(downsample)
        return FusedResidualBlock(body, last, downsample)

    def resnet(self, model: nn.Module) -> nn.Module:
        """The stem (conv1 → bn1 → relu) of a torchvision ResNet, then its blocks."""
        reason = (_not_relu(model.relu) or self.used_outside(model, ("conv1", "bn1", "relu"))
                  or self.reason(model.conv1, model.bn1))
        if reason:
            mark_stock(model.conv1, reason)
        else:
            model.conv1 = FusedConv2dBNReLU.from_modules(model.conv1, model.bn1, relu=True)
            model.bn1, model.relu = nn.Identity(), nn.Identity()  # ResNet.forward calls them after conv1 only
        for name, child in model.named_children():
            if name not in ("conv1", "bn1", "relu"):
                setattr(model, name, self.tree(child))
        return model

    # ---- any other model, through torch.fx ------------------------------------------------------

    def graph(self, module: nn.Module) -> nn.Module:
        """Fuse the Conv2d → BN (→ add) (→ ReLU) chains of module's fx graph (module docstring);
        returns module or its fx.GraphModule. Stock where torch.fx cannot stand for its forward."""
        reason, graph = untraced_reason(module)
        if reason:
            for child in module.children():
                if type(child) is nn.Conv2d:
                    mark_stock(child, reason)
            return module
        modules = dict(module.named_modules())
        chains = [chain for node in graph.nodes if node.op == "call_module" and type(modules[node.target]) is nn.Conv2d
                  for chain in [self.chain(modules, node, module)] if chain is not None]
        if any(chain.residual is not None for chain in chains) and not graph_rewrite_loses(module):
            return self.rewrite(module, graph, chains)
        for chain in chains:
            self.swap(module, modules, chain)
        return module

    def chain(self, modules, conv_node: fx.Node, owner: nn.Module) -> _Chain | None:
        """The chain from conv_node in owner's graph, or None (a refused conv marked with the reason).
        A BN or ReLU module that another forward calls too is not absorbed (the fused graph drops those
        it folds), nor a ReLU module that has hooks and another call here."""
        conv = modules[conv_node.target]
        bn_users = [u for u in conv_node.users if u.op == "call_module" and _is_batchnorm(modules[u.target])]
        if not bn_users:
            return None
        bn_node = bn_users[0]
        if len(conv_node.users) > 1:
            mark_stock(conv, "its output is used by more than the BatchNorm, which cannot be folded into it")
            return None
        if len(conv_node.args) != 1 or conv_node.kwargs:
            return None
        bn = modules[bn_node.target]
        read = [n.target for n in conv_node.graph.nodes if n.op == "get_attr" and
                n.target.rpartition(".")[0] in (conv_node.target, bn_node.target)]
        reason = self.reason(conv, bn) or (f"its BatchNorm is also called from outside {type(owner).__name__}"
                                           if self.called_elsewhere(bn, owner) else "") or \
            (f"{type(owner).__name__}.forward reads {read[0]}" if read else "")
        if reason:
            mark_stock(conv, reason)
            return None

        def absorbable_relu(node):
            if not _is_relu(node, modules):
                return False
            if node.op != "call_module":
                return True  # (torch.relu, F.relu, x.relu())
            relu = modules[node.target]
            return not self.called_elsewhere(relu, owner) and (self.called_once(relu) or not has_hooks(relu))

        after_bn = _only_user(bn_node)
        other = _residual_of(after_bn, bn_node)
        if other is not None and absorbable_relu(_only_user(after_bn)):
            nodes = [conv_node, bn_node, after_bn, _only_user(after_bn)]
            if not _mutation_between(nodes, modules):
                return _Chain(nodes, other, relu=True)
            return _Chain(nodes[:2], None, relu=False)  # (the fused call moves to the chain's end)
        if absorbable_relu(after_bn):
            return _Chain([conv_node, bn_node, after_bn], None, relu=True)
        return _Chain([conv_node, bn_node], None, relu=False)

    def rewrite(self, module: nn.Module, graph: fx.Graph, chains: list[_Chain]) -> fx.GraphModule:
        """module as an fx.GraphModule whose graph calls a fused module for each chain: where the
        conv was called, or where a residual chain ends (no in-place write lies between: chain)."""
        gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
        for chain in chains:
            conv_node, bn_node = chain.nodes[:2]
            fused = FusedConv2dBNReLU.from_modules(gm.get_submodule(conv_node.target), gm.get_submodule(bn_node.target),
                                                   relu=chain.relu, residual=chain.residual is not None)
            gm.add_submodule(conv_node.target, fused)  # the conv's place in the module tree
            with gm.graph.inserting_before(conv_node if chain.residual is None else chain.nodes[-1]):
                args = (conv_node.args[0],) if chain.residual is None else (conv_node.args[0], chain.residual)
                new = gm.graph.call_module(conv_node.target, args)
            chain.nodes[-1].replace_all_uses_with(new)
            for node in reversed(chain.nodes):
                gm.graph.erase_node(node)
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        return gm

    def swap(self, module: nn.Module, modules, chain: _Chain) -> None:
        """Fuse a chain in place, module's forward unchanged: its conv becomes the fused module, and
        the BN (and a ReLU module called only there) nn.Identity. A residual add stays as it is."""
        conv_node, bn_node = chain.nodes[:2]
        bn = modules[bn_node.target]
        if not self.called_once(bn):  # (an nn.Identity would stand in for its other calls too)
            mark_stock(modules[conv_node.target], "its BatchNorm is called more than once")
            return
        relu_node = chain.nodes[2] if chain.relu and chain.residual is None else None
        relu = relu_node is not None and relu_node.op == "call_module" and self.called_once(modules[relu_node.target])
        _set_submodule(module, conv_node.target, FusedConv2dBNReLU.from_modules(modules[conv_node.target], bn, relu))
        _set_submodule(module, bn_node.target, nn.Identity())
        if relu:
            _set_submodule(module, relu_node.target, nn.Identity())


def graph_rewrite_loses(module: nn.Module) -> str:
    """What module would lose as an fx.GraphModule, which keeps its traced forward and the modules
    and tensors that forward uses, and nothing else ('' if nothing): its class's other methods and
    attributes, its base classes, its plain attributes, its hooks."""
    cls = type(module)
    if cls.__bases__ != (nn.Module,):
        return f"{cls.__name__} derives from {cls.__bases__[0].__name__}"
    own = [name for name in vars(cls) if name not in ("__init__", "forward") and not
           (name.startswith("__") and name.endswith("__"))]
    plain = [name for name in vars(module) if not name.startswith("_") and name != "training"]
    if own or plain:
        return f"{cls.__name__} has {(own + plain)[0]!r}"
    return "its hooks" if has_hooks(module) else ""


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _mutation_between(chain: list[fx.Node], modules) -> bool:
    """Whether a node between a chain's first and last (in graph order; not the chain's own) may write a
    tensor in place: the fused call then cannot move from the conv's place to the chain's end."""
    node = chain[0].next
    while node is not chain[-1]:
        if node not in chain and _writes_in_place(node, modules):
            return True
        node = node.next
    return False


_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
                       operator.ilshift, operator.irshift, operator.setitem}


def _writes_in_place(node: fx.Node, modules) -> bool:
    """Whether node may write a tensor in place: an in-place module (ReLU(inplace=True)), method (x.add_)
    or function (torch.relu_, F.relu(x, inplace=True), x += y, x[i] = y, out=)."""
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.endswith("__")) or \
            bool(node.kwargs.get("inplace")) or "out" in node.kwargs
    return False


def _not_relu(activation: nn.Module) -> str:
    """Why a ResNet's activation module cannot be fused as ReLU ('' if it can)."""
    return "" if type(activation) is nn.ReLU else f"the activation is {type(activation).__name__}, not ReLU"


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or is_frozen_batchnorm(module)


def _has_conv_bn_children(module: nn.Module) -> bool:
    kinds = {type(child) for child in module.children()}
    return nn.Conv2d in kinds and any(_is_batchnorm(child) for child in module.children())


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_relu(node: fx.Node | None, modules) -> bool:
    if node is None:
        return False
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    return (node.op == "call_function" and node.target in _RELU_CALLS) or \
        (node.op == "call_method" and node.target in ("relu", "relu_"))


def _residual_of(add: fx.Node | None, bn_node: fx.Node) -> fx.Node | None:
    """The other operand when `add` is bn_node + tensor (no alpha, no out=), else None."""
    if add is None or add.kwargs or len(add.args) != 2:
        return None
    if not ((add.op == "call_function" and add.target in _ADD_CALLS) or
            (add.op == "call_method" and add.target in ("add", "add_"))):
        return None
    in_place = add.target in (operator.iadd, "add_")
    if in_place and add.args[0] is not bn_node:
        return None  # `other += bn(...)` writes into other, which may be used elsewhere
    other = add.args[1] if add.args[0] is bn_node else add.args[0]
    if other is bn_node or not isinstance(other, fx.Node):
        return None  # bn + bn, or bn + a constant
    return other
