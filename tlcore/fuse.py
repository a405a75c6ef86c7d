"""`tlcore.fuse(model)`: swap conv → BN (→ residual add) (→ ReLU) chains for fused kernels.

torchvision ResNets (BasicBlock, Bottleneck, the stem) are rewritten by handlers that
keep the model's class and module names; in any other module, Conv2d → BatchNorm2d
(→ add) (→ ReLU) chains are found in its torch.fx graph, and that module becomes an
fx.GraphModule (its forward is the traced graph). A conv that cannot be fused stays
stock, and print(model) says why.

torch.fx records `a += b` as `a + b`: a forward that adds in place into a tensor it reads
again afterwards traces into a different function, fused or not. torchvision's blocks
(`out += identity; out = relu(out)`) are not affected, and are not traced anyway.
"""
import copy
import operator
import warnings
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F
from torch import fx, nn

from tlcore.nn.blocks import FusedResidualBlock
from tlcore.nn.conv import FusedConv2dBNReLU, fusion_unsupported_reason, is_frozen_batchnorm, mark_stock

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
    memory format work, channels_last is fastest. torchvision ResNets keep their class;
    other models whose chains are found through torch.fx come back as fx.GraphModules.
    """
    require_eval(model, "tlcore.fuse folds BatchNorm running statistics and returns an inference model")
    if not inplace:
        model = copy.deepcopy(model)
    hooked = {name: m for name, m in model.named_modules() if has_hooks(m)}
    fused = _Fuser(model).tree(model).eval()  # new modules start in train mode
    kept = {id(m) for m in fused.modules()}
    dropped = [name or type(model).__name__ for name, m in hooked.items() if id(m) not in kept]
    if dropped:
        warnings.warn(f"tlcore.fuse: the hooks on {dropped} are gone with those modules, which were fused into "
                      "others: register them on the fused model", stacklevel=2)
    return fused


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


def _callers(model: nn.Module) -> dict[int, Counter]:
    """For each module called in the forwards of model's tree (by id): how many calls each caller's
    forward makes (by the caller's id). Modules whose forward does not trace are not counted."""
    callers = defaultdict(Counter)
    for module in model.modules():
        if next(module.children(), None) is None:
            continue
        try:
            graph = _trace(module)
        except Exception:  # noqa: BLE001 - untraceable forwards stay stock anyway
            continue
        for node in graph.nodes:
            if node.op == "call_module":
                callers[id(module.get_submodule(node.target))][id(module)] += 1
    return callers


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
        """Fuse Conv2d → BN (→ add) (→ ReLU) chains in module's fx graph; stock if it does not trace."""
        try:
            graph = _trace(module)
        except Exception as error:  # noqa: BLE001 - any tracing failure means: leave it stock
            for child in module.children():
                if type(child) is nn.Conv2d:
                    mark_stock(child, f"{type(module).__name__} does not trace with torch.fx "
                                      f"({type(error).__name__})")
            return module
        gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
        modules = dict(gm.named_modules())
        fused_any = False
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and type(modules[node.target]) is nn.Conv2d:
                fused_any |= self.chain(gm, modules, node, module)
        if not fused_any:
            return module
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        return gm

    def chain(self, gm: fx.GraphModule, modules, conv_node: fx.Node, owner: nn.Module) -> bool:
        """Replace conv_node → bn (→ add residual → relu | → relu) in owner's graph with one fused call
        (a BN or ReLU module that another forward calls too stays: the fused graph drops those it folds)."""
        conv = modules[conv_node.target]
        bn_users = [u for u in conv_node.users if u.op == "call_module" and _is_batchnorm(modules[u.target])]
        if not bn_users:
            return False
        bn_node = bn_users[0]
        if len(conv_node.users) > 1:
            mark_stock(conv, "its output is used by more than the BatchNorm, which cannot be folded into it")
            return False
        if len(conv_node.args) != 1 or conv_node.kwargs:
            return False
        bn = modules[bn_node.target]
        reason = self.reason(conv, bn) or (f"its BatchNorm is also called from outside {type(owner).__name__}"
                                           if self.called_elsewhere(bn, owner) else "")
        if reason:
            mark_stock(conv, reason)
            return False
        absorbable_relu = lambda node: _is_relu(node, modules) and not (  # noqa: E731
            node.op == "call_module" and self.called_elsewhere(modules[node.target], owner))
        chain, residual, relu = [conv_node, bn_node], None, False
        after_bn = _only_user(bn_node)
        other = _residual_of(after_bn, bn_node)
        if other is not None and absorbable_relu(_only_user(after_bn)):
            residual, relu = other, True
            chain += [after_bn, _only_user(after_bn)]
        elif absorbable_relu(after_bn):
            relu = True
            chain.append(after_bn)
        fused = FusedConv2dBNReLU.from_modules(conv, bn, relu=relu, residual=residual is not None)
        gm.add_submodule(conv_node.target, fused)  # the conv's place in the module tree
        with gm.graph.inserting_before(chain[-1]):
            args = (conv_node.args[0],) if residual is None else (conv_node.args[0], residual)
            new = gm.graph.call_module(conv_node.target, args)
        chain[-1].replace_all_uses_with(new)
        for node in reversed(chain):
            gm.graph.erase_node(node)
        return True


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
