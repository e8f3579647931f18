"""Cache sites of any transformer, found from its structure and one traced call: no family file.

- **Stacks**: the shallowest ``ModuleList``s whose members are all of one class with
  submodules (diffusers' ``transformer_blocks`` / ``single_transformer_blocks`` / ``blocks``, a
  user DiT's ``blocks``), kept when every member runs exactly once in the traced call, in the
  order they ran.
- **Streams**: which input each output of a block replaces, from the identity of the tensors
  flowing through the traced call: output ``j`` of block ``i`` is the tensor that block ``i+1``
  of the same stack receives as argument ``X`` (never by position or shape). A list whose blocks
  do not hand their outputs on (the model changes them in between) or a one-block list takes the
  streams of its block class from a chained stack, else from diffusers' own block metadata
  (:func:`~cachelab.models.diffusers_private.block_metadata`); a one-block list with none of
  these whose block holds attention or feed-forward modules has its outputs cached as they are
  (no residual), any other is no stack. An output received as two arguments is an error naming
  the block class; one no next block receives unchanged is cached as it is.
- **Module sites**: the children (or grandchildren) of each block that are attention or
  feed-forward modules (by class name: ``*Attention*``, ``*FeedForward*``, ``*Mlp*``/``*MLP*``)
  and ran exactly once (a module run twice per forward, e.g. one feed-forward for both streams,
  would hold two values: no site). Where these hold less than ``MODULE_COVERAGE`` of a stack's
  FLOPs in the traced call (``torch.utils.flop_counter``: attention and MLP in parallel merged by
  one projection, as in FLUX's and HunyuanVideo's single-stream blocks, or compute outside the
  attention and feed-forward children), the stack's blocks are cached whole at module
  granularity (their block sites), so that a forecast step skips all of a block's expensive
  compute. Feed-forwards and cross-attention of diffusers' own classes can recompute a subset of
  their tokens (token selection, :func:`token_mode`).
- **Probes** for adaptive schedules: ``first_block_residual`` (the first block's image-stream
  residual) everywhere; ``modulated_input`` where the first block's ``norm1`` is an adaptive
  norm, known by what it does in the traced call: it receives a conditioning tensor besides its
  input (one that is not a stream of the block: the timestep embedding), as diffusers' adaLN
  and its kin do, whatever their class is called (they return the modulated input first);
  else not offered.

:func:`discover` traces one forward of the model (a :class:`Recorder` on every candidate block
records what flows through). Inside a longer run (a pipeline call), :class:`FirstForward` traces
the model's first forward and hands its output back to the run, which goes on untraced.
"""
from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn

from cachelab.core import hooks
from cachelab.core.outputs import split
from cachelab.core.sites import GRANULARITIES, SitePattern, SitePatterns
from cachelab.core.tokens import TOKENWISE
from cachelab.errors import ConfigError
from cachelab.models.coverage import FlopTally
from cachelab.models.diffusers_private import block_metadata

ATTENTION = ("Attention",)
FEED_FORWARD = ("FeedForward", "Mlp", "MLP")
IMAGE_STREAM_NAMES = ("hidden_states", "x", "img", "visual_embed", "gen_seq")
MODULE_COVERAGE = 0.9  # the least share of a stack's FLOPs its module sites hold; else its blocks are the sites


@dataclass(frozen=True)
class Stack:
    """One stack of blocks: ``name`` the attribute holding the ``ModuleList``; ``streams[j]``
    the argument that output ``j`` of a block replaces; ``image`` the index of the image stream."""

    name: str
    block_class: str
    size: int
    streams: tuple[str | None, ...]
    image: int | None
    returns_tuple: bool = True
    chained: bool = True         # each block hands an output on to the next (else: diffusers' metadata)
    hands_on_next: bool = False  # its last block hands an output on to the next stack's first block
    module_share: float | None = None  # the share of its blocks' FLOPs their module sites hold (None: not counted)

    @property
    def whole_blocks(self) -> bool:
        """Whether module granularity caches its blocks whole (module sites hold too little of them)."""
        return self.module_share is not None and self.module_share < MODULE_COVERAGE

    @property
    def regex(self) -> str:
        return rf"{re.escape(self.name)}\.\d+"

    @property
    def residual(self) -> str | tuple[str | None, ...] | None:
        """As :class:`SitePattern` takes it: the argument name of a block returning one tensor."""
        return self.streams if self.returns_tuple else self.streams[0]


@dataclass
class Call:
    """What one block received and returned in the traced call."""

    arguments: dict[str, object]
    outputs: list
    returns_tuple: bool


class DiscoveredSites:
    """The sites of one model at every granularity (a ``SiteSource`` for :class:`Strategy`)."""

    def __init__(self, model: nn.Module, stacks: list[Stack], module_sites: list[str], norm1: str | None):
        self.model, self.stacks, self.module_sites = model, stacks, module_sites
        self.probes = {}
        first = stacks[0] if stacks else None
        if first is not None and first.image is not None:
            residual = (tuple(name if j == first.image else None for j, name in enumerate(first.streams))
                        if first.returns_tuple else first.residual)
            self.probes["first_block_residual"] = SitePattern(rf"{re.escape(first.name)}\.0", residual=residual)
        if norm1 is not None:
            self.probes["modulated_input"] = SitePattern(re.escape(norm1))

    def site_patterns(self, granularity: str) -> SitePatterns:
        if granularity == "output":
            return SitePatterns([SitePattern("")])
        if granularity not in GRANULARITIES:
            raise ConfigError(f"granularity={granularity!r} is not allowed; allowed: {', '.join(GRANULARITIES)}")
        if not self.stacks:
            raise ConfigError(f"{type(self.model).__name__} has no discoverable blocks (no ModuleList of blocks that "
                              f"each ran once and hand an output on, or that diffusers has metadata for); allowed: "
                              f"strategy.granularity=output, or site patterns: cachelab.apply(model, strategy, "
                              f"sites={{'{granularity}': [SitePattern(r'<regex>', residual='<argument>')]}})")
        if granularity == "module":
            whole = [SitePattern(s.regex, residual=s.residual) for s in self.stacks if s.whole_blocks]
            return SitePatterns(module_patterns(self.model, self.module_sites) + whole, self.probes)
        if granularity == "block":
            return SitePatterns([SitePattern(s.regex, residual=s.residual) for s in self.stacks], self.probes)
        return SitePatterns([self.span()], self.probes)

    def span(self) -> SitePattern:
        """One span over the trunk (FBCache's "the remaining blocks"): the run of stacks, in the
        order they ran, that hand their outputs on block after block and stack after stack, with
        the same streams, every output one (a span passes its inputs through); the longest one."""
        runs, current = [], []
        for stack in self.stacks:
            fits = (stack.chained or stack.size == 1) and None not in stack.streams
            if current and fits and current[-1].hands_on_next and stack.streams == current[-1].streams:
                current.append(stack)
            else:
                current = [stack] if fits else []
                runs.append(current)
        trunk = max(runs, key=lambda run: sum(s.size for s in run), default=[])
        if not trunk:
            raise ConfigError(f"no stack of {type(self.model).__name__} hands every output on from block to block, so "
                              f"none can be one span; allowed: strategy.granularity in module, block, output")
        return SitePattern("|".join(s.regex for s in trunk), residual=trunk[0].residual, span=True)

    def describe(self, module: bool = True) -> str:
        """One line per stack and the module sites (``module``: how module granularity uses them): what was found."""
        lines = [f"{s.name}: {s.size} x {s.block_class}, outputs replace "
                 f"{', '.join(name or '(cached as is)' for name in s.streams)}"
                 + (f"; cached whole at module granularity (attention and feed-forward modules hold "
                    f"{s.module_share:.0%} of its FLOPs)" if module and s.whole_blocks else "")
                 + ("; FLOPs not countable (module sites kept)" if module and s.module_share is None else "")
                 for s in self.stacks]
        kinds = sorted({name.rsplit(".", 1)[-1] for name in self.module_sites})
        lines += [f"module sites: {len(self.module_sites)} ({', '.join(kinds) or 'none'})"] if module else []
        return "\n".join(lines + [f"probes: {', '.join(sorted(self.probes)) or 'none'}"])


def candidate_stacks(model: nn.Module) -> dict[str, nn.ModuleList]:
    """The ModuleLists whose members are all of one class with submodules, at the shallowest
    depth that has any (the model's own stacks, not a text refiner nested inside an embedder;
    through a wrapper module too)."""
    found: dict[int, dict[str, nn.ModuleList]] = {}
    for name, child in model.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) and len({type(block) for block in child}) == 1 \
                and any(True for _ in child[0].children()):
            found.setdefault(name.count("."), {})[name] = child
    return found[min(found)] if found else {}


def module_patterns(model: nn.Module, names: list[str]) -> list[SitePattern]:
    """The module sites ``names`` as patterns grouped by :func:`token_mode` (module order is kept:
    sites are matched in the model's module order)."""
    modules = dict(model.named_modules())
    groups: dict[str | None, list[str]] = {}
    for name in names:
        groups.setdefault(token_mode(modules[name]), []).append(name)
    return [SitePattern("|".join(re.escape(name) for name in group), tokens=mode) for mode, group in groups.items()]


def token_mode(module: nn.Module) -> str | None:
    """How a discovered module site computes a subset of its tokens exactly (token selection):
    ``"tokenwise"`` for diffusers' ``FeedForward``, timm's ``Mlp`` (exactly that class) and
    diffusers' classic ``Attention`` used as cross-attention without a group or spatial norm (the
    queries are the tokens; keys and values come from the text); None (refused) for everything
    else: self- and joint attention, and feed-forwards of other classes, which may mix tokens
    (convolutions)."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention
    from timm.layers import Mlp

    if isinstance(module, FeedForward) or type(module) is Mlp:
        return TOKENWISE
    if (isinstance(module, Attention) and getattr(module, "is_cross_attention", False)  # subclasses may lack them
            and getattr(module, "group_norm", None) is None and getattr(module, "spatial_norm", None) is None):
        return TOKENWISE
    return None


def block_children(block: nn.Module, depth: int = 2) -> list[tuple[str, nn.Module]]:
    """The attention and feed-forward modules of a block: its children, or its grandchildren
    where a child wraps them (HiDream's ``block``); never a module inside a matched one."""
    found = []

    def walk(module: nn.Module, prefix: str, level: int) -> None:
        for name, child in module.named_children():
            if any(word in type(child).__name__ for word in ATTENTION + FEED_FORWARD):
                found.append((prefix + name, child))
            elif level < depth:
                walk(child, f"{prefix}{name}.", level + 1)

    walk(block, "", 1)
    return found


class Recorder:
    """What one traced forward passed through the candidate blocks of a model (``stacks``): each
    block's calls (:class:`Call`), the order blocks ran in, how often each attention or
    feed-forward child ran, and the tensors the first block of each stack gave its ``norm1``.
    It records while its hooks are on (:meth:`attach`; the handles remove them)."""

    def __init__(self, stacks: dict[str, nn.ModuleList]):
        self.stacks = stacks
        self.calls: dict[tuple[str, int], list[Call]] = {}
        self.order: list[tuple[str, int]] = []
        self.runs: dict[str, int] = {}
        self.norm_inputs: dict[str, list[torch.Tensor]] = {}  # stack -> the tensors its first block's norm1 received
        self._open: dict[tuple[str, int], list[dict[str, object]]] = {}  # the arguments of calls not yet returned
        self._signatures = {(name, i): inspect.signature(block.forward)
                            for name, blocks in stacks.items() for i, block in enumerate(blocks)}

    def attach(self) -> list:
        """Hook every candidate block, its attention and feed-forward children and each stack's first
        ``norm1``; -> the hooks' handles."""
        handles = []
        for stack_name, blocks in self.stacks.items():
            for index, block in enumerate(blocks):
                key = (stack_name, index)
                handles += [block.register_forward_pre_hook(partial(self._entered, key), with_kwargs=True),
                            block.register_forward_hook(partial(self._returned, key), with_kwargs=True)]
                handles += [child.register_forward_hook(partial(self._ran, f"{stack_name}.{index}.{child_name}"))
                            for child_name, child in block_children(block)]
            norm = getattr(blocks[0], "norm1", None)
            if isinstance(norm, nn.Module):
                handles.append(norm.register_forward_pre_hook(partial(self._normalised, stack_name), with_kwargs=True))
        return handles

    def _entered(self, key: tuple[str, int], module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = self._signatures[key].bind_partial(*args, **kwargs).arguments
        arguments.update(arguments.pop("kwargs", {}) if isinstance(arguments.get("kwargs"), dict) else {})
        self._open.setdefault(key, []).append(arguments)
        self.order.append(key)

    def _returned(self, key: tuple[str, int], module: nn.Module, args: tuple, kwargs: dict, out) -> None:
        self.calls.setdefault(key, []).append(Call(self._open[key].pop(), split(out)[0],
                                                   not isinstance(out, torch.Tensor)))

    def _ran(self, path: str, module: nn.Module, args: tuple, out) -> None:
        self.runs[path] = self.runs.get(path, 0) + 1

    def _normalised(self, stack_name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        received = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
        self.norm_inputs.setdefault(stack_name, received)


class FirstForward:
    """Discovery inside a run that calls ``model`` (a pipeline call): while :meth:`trace` runs it,
    the model's first forward is traced (:func:`discover`) and its output handed back to the run;
    every later forward runs untraced, and the run goes on to its end. ``inputs``: the traced
    forward's ``(args, kwargs)``; ``sites``: what it found (both None until it ran)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.inputs: tuple[tuple, dict] | None = None
        self.sites: DiscoveredSites | None = None
        self.name = f"cachelab discovery at {id(self):#x}"

    def trace(self, run: Callable[[], object]) -> FirstForward:
        """Run ``run`` with the model's forward hooked (innermost but the sites); -> self."""
        hooks.install(self.model, "forward", self.name, self._forward, hooks.TALLY, by=self)
        try:
            run()
        finally:
            hooks.remove(self.model, "forward", self.name)
        if self.sites is None:
            raise ConfigError(f"site discovery: {type(self.model).__name__} was never called in the traced run; "
                              f"allowed: a run that calls the model, or site patterns (sites=...)")
        return self

    def _forward(self, forward: Callable) -> Callable:
        def first_forward_traced(*args, **kwargs):
            if self.sites is not None:
                return forward(*args, **kwargs)
            self.inputs = (args, kwargs)
            self.sites, out = trace_call(self.model, partial(forward, *args, **kwargs))
            return out

        return first_forward_traced


def discover(model: nn.Module, call: Callable[[], object]) -> DiscoveredSites:
    """Run ``call`` (one forward of ``model``) with a :class:`Recorder` on every candidate block and
    module site, and read the stacks, streams and module sites from what flowed through."""
    return trace_call(model, call)[0]


def trace_call(model: nn.Module, call: Callable[[], object]) -> tuple[DiscoveredSites, object]:
    """:func:`discover`, and what ``call`` returned. The FLOPs are counted in the same call; where
    they cannot be (flex_attention under a dispatch mode), it runs again without counting."""
    stacks = candidate_stacks(model)
    try:
        recorder, tally, out = _record(stacks, call, FlopTally())
    except Exception:  # noqa: BLE001 -- FLOPs not countable here: traced again, their share unknown (None)
        recorder, tally, out = _record(stacks, call, None)
    return _sites(model, recorder, tally), out


def _record(stacks: dict[str, nn.ModuleList], call: Callable[[], object],
            tally: FlopTally | None) -> tuple[Recorder, FlopTally | None, object]:
    """One run of ``call`` under a fresh :class:`Recorder` (and ``tally``, watching every block and
    module site)."""
    recorder = Recorder(stacks)
    handles = recorder.attach()
    if tally is not None:
        for stack_name, blocks in stacks.items():
            for index, block in enumerate(blocks):
                tally.watch(f"{stack_name}.{index}", block)
                for child_name, child in block_children(block):
                    tally.watch(f"{stack_name}.{index}.{child_name}", child)
    try:
        with torch.no_grad(), tally if tally is not None else contextlib.nullcontext():
            out = call()
    finally:
        for handle in handles:
            handle.remove()
    return recorder, tally, out


def _sites(model: nn.Module, recorder: Recorder, tally: FlopTally | None) -> DiscoveredSites:
    """The stacks, module sites and probes that ``recorder`` saw (shares of FLOPs from ``tally``)."""
    stacks = recorder.stacks
    found = _stacks(stacks, recorder.calls, recorder.order)
    # a module called more than once per forward (one feed-forward for both streams) holds two values: no site
    module_sites = {s.name: [path for i in range(s.size)
                             for path in (f"{s.name}.{i}.{name}" for name, _ in block_children(stacks[s.name][i]))
                             if recorder.runs.get(path) == 1]
                    for s in found}
    found = [replace(s, module_share=_share(tally, [f"{s.name}.{i}" for i in range(s.size)], module_sites[s.name]))
             for s in found]
    module_sites = [path for s in found if not s.whole_blocks for path in module_sites[s.name]]
    norm1 = f"{found[0].name}.0.norm1" if found and _adaptive_norm(recorder, found[0]) else None
    return DiscoveredSites(model, found, module_sites, norm1)


def _adaptive_norm(recorder: Recorder, stack: Stack) -> bool:
    """Whether the ``norm1`` of the first block of ``stack`` is an adaptive norm: in the traced
    call it received, besides its input, a tensor that is none of the block's streams (the
    conditioning: diffusers' adaLN gets the timestep embedding, DiT's the timestep and label)."""
    received = recorder.norm_inputs.get(stack.name, [])
    arguments = recorder.calls[(stack.name, 0)][0].arguments
    streams = [arguments[name] for name in stack.streams if name in arguments]
    return any(all(value is not stream for stream in streams) for value in received[1:])


def _share(tally: FlopTally | None, blocks: list[str], parts: list[str]) -> float | None:
    """The share of the FLOPs of ``blocks`` that the modules ``parts`` ran (1 for blocks that ran
    none; None where the FLOPs could not be counted)."""
    if tally is None:
        return None
    total = sum(tally.flops.get(name, 0) for name in blocks)
    return sum(tally.flops.get(name, 0) for name in parts) / total if total else 1.0


def _stacks(stacks: dict[str, nn.ModuleList], calls: dict, order: list) -> list[Stack]:
    """The stacks that ran block by block once, in the order they ran, with their streams.
    A list of two or more blocks that hand an output on from one to the next (a chain) reads
    its streams from the tensors handed on; any other list takes its class's streams from such
    a chain or from diffusers' metadata, else it is left out (a list of text projections, ...).
    An output no next block receives unchanged has no stream (None): it is cached as it is; so
    are all outputs of a one-block list whose class has no known streams and whose block holds
    attention or feed-forward modules (a transformer block, not a lone adapter)."""
    ran = []
    for stack_name, _ in order:
        blocks = stacks[stack_name]
        if stack_name not in ran and all(len(calls.get((stack_name, i), [])) == 1 for i in range(len(blocks))):
            ran.append(stack_name)
    chains = {name: [calls[(name, i)][0] for i in range(len(stacks[name]))] for name in ran}
    chained = {name for name, chain in chains.items()
               if len(chain) > 1 and all(_hands_on(a, b) for a, b in zip(chain, chain[1:]))}
    known = {}
    for name in chained:
        known[type(stacks[name][0])] = _streams(stacks[name], list(zip(chains[name], chains[name][1:])))
    found = []
    for name in ran:
        block_class, first = type(stacks[name][0]), chains[name][0]
        streams = known.get(block_class) or _registry_streams(block_class, len(first.outputs))
        if streams is None and len(stacks[name]) == 1 and block_children(stacks[name][0]):
            streams = (None,) * len(first.outputs)
        if streams is not None:
            found.append(Stack(name, block_class.__name__, len(stacks[name]), streams, _image_stream(block_class, streams),
                               first.returns_tuple, name in chained))
    return [replace(stack, hands_on_next=_hands_on(chains[stack.name][-1], chains[following.name][0]))
            for stack, following in zip(found, found[1:])] + found[-1:]


def _hands_on(this: Call, following: Call) -> bool:
    """Whether some output of a block is an argument of the next one (the same tensor)."""
    return any(value is out for out in this.outputs if out is not None for value in following.arguments.values())


def _paired(this: Call, following: Call | None, block_class: str) -> tuple[str | None, ...] | None:
    """The argument of ``following`` that each output of ``this`` is, by identity (None for an
    output it does not receive unchanged: that output is cached as it is); None when nothing
    pairs. An output received as two arguments is ambiguous: an error naming the class."""
    if following is None:
        return None
    names = []
    for out in this.outputs:
        matches = [name for name, value in following.arguments.items() if out is not None and value is out]
        if len(matches) > 1:
            raise ConfigError(f"an output of {block_class} reaches the next block as {', '.join(matches)}: which input "
                              f"it replaces is ambiguous; pass site patterns yourself "
                              f"(SitePattern(regex, residual=(<argument per output>)))")
        names.append(matches[0] if matches else None)
    return tuple(names) if any(names) else None


def _streams(blocks: nn.ModuleList, pairs: list[tuple[Call, Call]]) -> tuple[str | None, ...]:
    """The argument each block output replaces (None: cached as it is), the same for every pair
    of neighbours; pairs that disagree are an error naming the block class."""
    block_class = type(blocks[0]).__name__
    answers = {_paired(this, following, block_class) for this, following in pairs}
    if len(answers) != 1:
        raise ConfigError(f"the outputs of {block_class} reach the next block as different inputs from block to "
                          f"block; pass site patterns yourself (SitePattern(regex, residual=(<argument per output>)))")
    return answers.pop()


def _registry_streams(block_class: type, num_outputs: int) -> tuple[str, ...] | None:
    """The streams from diffusers' own block metadata, when it has some for ``block_class``."""
    metadata = block_metadata(block_class)
    if metadata is None:
        return None
    streams = [None] * num_outputs
    if metadata.return_hidden_states_index is not None and metadata.return_hidden_states_index < num_outputs:
        streams[metadata.return_hidden_states_index] = metadata.hidden_states_argument_name
    index = metadata.return_encoder_hidden_states_index
    if index is not None and index < num_outputs:
        streams[index] = metadata.encoder_hidden_states_argument_name
    return tuple(streams) if None not in streams else None


def _image_stream(block_class: type, streams: tuple[str | None, ...]) -> int | None:
    """The output that carries the image (latent) tokens, among those with a stream: diffusers'
    metadata, else by name, else the first; None when no output has a stream."""
    names = _registry_streams(block_class, len(streams)) or streams
    with_stream = [j for j, name in enumerate(streams) if name is not None]
    for candidate in IMAGE_STREAM_NAMES:
        if candidate in names and names.index(candidate) in with_stream:
            return names.index(candidate)
    return with_stream[0] if with_stream else None
