"""``quantize_model``: swap a float model's ``nn.Conv2d``/``nn.Linear`` for the quantized classes a
spec names, copying parameters. The float model definitions know nothing of quantization.

The spec (a dict or an OmegaConf node, what ``configs/quant/*.yaml`` holds):

    method:    fp | bwn | xnor | ternary | hq | fda
    estimator: null (the method's default) | a registry name | {name: ..., **hyperparameters}
    keep_fp:   [first, last]  # also `downsample` (1x1 shortcut convs) and name globs
    overrides: {"layer4.*": {method: bwn}, first: {method: bwn}}   # name glob -> partial spec
    embeddings: fp (default: nn.Embedding tables stay float) | int8 (``layers.QuantizedEmbedding``)
    <any other key>: a method hyperparameter passed to the layers (e.g. target_sparsity: 0.9)

Resolution per layer: the base spec; ``fp`` if the layer is in keep_fp; then every override whose
glob matches, in order (overrides win over keep_fp). ``first``/``last`` are the first/last
Conv2d or Linear in registration order. A wrong method or estimator, a hyperparameter the method
does not take, or a glob (in keep_fp or overrides) that matches no layer raises ValueError.

``embeddings`` is the method of every exact ``nn.Embedding`` (a language model's token and position
tables), which keep_fp and overrides do not name (they select Conv2d/Linear layers): ``int8``
stores each row at 8 bits with the spec's estimator (default identity STE); ``fp`` leaves them.
"""
from __future__ import annotations

import fnmatch

from torch import nn

import estimators
from layers import LAYER_CLASSES, METHOD_NAMES, QuantizedEmbedding, get_method
from layers.embedding import check_embedding_method

from .modules import replace_submodule
from .plain import to_plain

SWAPPABLE = (nn.Conv2d, nn.Linear)
SPEC_KEYS = ("method", "estimator", "keep_fp", "overrides", "embeddings")
KEYWORDS = ("first", "last", "downsample")
DEFAULT_KEEP_FP = ("first", "last")


def swappable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every float Conv2d/Linear (exact types and subclasses) in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SWAPPABLE)]


def is_downsample(name: str, module: nn.Module) -> bool:
    """A 1x1 convolution on a residual shortcut (torchvision names it `downsample`, CIFAR code `shortcut`)."""
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
            and any(part in ("downsample", "shortcut") for part in name.split(".")))


def _selector_matches(selector: str, name: str, module: nn.Module, first: str, last: str) -> bool:
    if selector == "first":
        return name == first
    if selector == "last":
        return name == last
    if selector == "downsample":
        return is_downsample(name, module)
    return fnmatch.fnmatchcase(name, selector)


def _check_spec(spec: dict, where: str) -> None:
    if "method" in spec and spec["method"] not in METHOD_NAMES:
        raise ValueError(f"{where}: unknown quantization method {spec['method']!r}; "
                         f"valid methods: {', '.join(METHOD_NAMES)}")
    est = spec.get("estimator")
    if est is not None:
        estimators.get(est)  # raises ValueError naming the bad estimator or hyperparameter


def resolve_layer_specs(model: nn.Module, spec) -> dict[str, dict]:
    """The effective per-layer spec (method, estimator, options) for every swappable layer."""
    spec = dict(to_plain(spec) or {})
    if "method" not in spec:
        raise ValueError(f"a quantization spec needs a 'method' (one of {', '.join(METHOD_NAMES)}), "
                         f"got keys {sorted(spec)}")
    _check_spec(spec, "quantization spec")
    keep_fp = list(spec.get("keep_fp", DEFAULT_KEEP_FP) or [])
    overrides = dict(spec.get("overrides") or {})
    base = {k: v for k, v in spec.items() if k not in ("keep_fp", "overrides", "embeddings")}
    layers_ = swappable_layers(model)
    if not layers_:
        return {}
    first, last = layers_[0][0], layers_[-1][0]

    def matching(selector):
        return [n for n, m in layers_ if _selector_matches(selector, n, m, first, last)]

    for selector in keep_fp:
        if selector not in KEYWORDS and not matching(selector):
            raise ValueError(f"keep_fp entry {selector!r} matches no Conv2d/Linear layer; "
                             f"layer names: {[n for n, _ in layers_]}")
    resolved = {}
    for selector, partial in overrides.items():
        partial = dict(to_plain(partial) or {})
        if "keep_fp" in partial or "overrides" in partial:
            raise ValueError(f"override {selector!r} may not contain keep_fp/overrides")
        _check_spec(partial, f"override {selector!r}")
        if not matching(selector):
            raise ValueError(f"override {selector!r} matches no Conv2d/Linear layer; "
                             f"layer names: {[n for n, _ in layers_]}")
        overrides[selector] = partial
    for name, module in layers_:
        layer_spec = dict(base)
        if any(_selector_matches(s, name, module, first, last) for s in keep_fp):
            layer_spec["method"] = "fp"
        for selector, partial in overrides.items():
            if _selector_matches(selector, name, module, first, last):
                if "method" in partial and partial["method"] != layer_spec["method"]:
                    # a method change keeps the estimator but drops the old method's hyperparameters
                    layer_spec = {"estimator": layer_spec.get("estimator")}
                layer_spec.update(partial)
        resolved[name] = layer_spec
    return resolved


def build_quantized_layer(float_layer: nn.Module, layer_spec: dict, name: str = "") -> nn.Module:
    """The drop-in replacement of ``float_layer`` (same arguments, parameters copied)."""
    method = layer_spec.get("method", "fp")
    if method == "fp":
        return float_layer
    cls = LAYER_CLASSES.get((method, type(float_layer)))
    if cls is None:
        raise ValueError(f"layer {name!r} of type {type(float_layer).__name__} cannot be quantized; "
                         f"only exact nn.Conv2d and nn.Linear are swapped")
    options = {k: v for k, v in layer_spec.items() if k not in SPEC_KEYS}
    unknown = set(options) - get_method(method).option_names()
    if unknown:
        raise ValueError(f"layer {name!r}: method {method!r} takes no option(s) {sorted(unknown)}; "
                         f"valid options: {sorted(get_method(method).option_names() - {'estimator'})}")
    if layer_spec.get("estimator") is not None:
        options["estimator"] = layer_spec["estimator"]
    weight = float_layer.weight
    factory = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(float_layer, nn.Conv2d):
        new = cls(float_layer.in_channels, float_layer.out_channels, float_layer.kernel_size,
                  stride=float_layer.stride, padding=float_layer.padding, dilation=float_layer.dilation,
                  groups=float_layer.groups, bias=float_layer.bias is not None,
                  padding_mode=float_layer.padding_mode, **factory, **options)
    else:
        new = cls(float_layer.in_features, float_layer.out_features, bias=float_layer.bias is not None,
                  **factory, **options)
    new.load_state_dict(float_layer.state_dict())
    new.train(float_layer.training)
    return new


def embedding_method(spec) -> str:
    """The spec's ``embeddings`` method ("fp" when absent); ValueError for one embeddings cannot take."""
    method = (to_plain(spec) or {}).get("embeddings") or "fp"
    check_embedding_method(method)
    return method


def quantize_model(model: nn.Module, spec) -> nn.Module:
    """Swap every Conv2d/Linear of ``model`` as ``spec`` says (in place), and every nn.Embedding
    when ``spec["embeddings"]`` names a method; return the model."""
    embeddings = embedding_method(spec)
    for name, layer_spec in resolve_layer_specs(model, spec).items():
        float_layer = model.get_submodule(name)
        new = build_quantized_layer(float_layer, layer_spec, name)
        if new is float_layer:
            continue
        model = replace_submodule(model, name, new)
    if embeddings != "fp":
        estimator = (to_plain(spec) or {}).get("estimator")
        tables = [name for name, m in model.named_modules() if type(m) is nn.Embedding]
        for name in tables:
            model = replace_submodule(model, name, QuantizedEmbedding.from_float(model.get_submodule(name), embeddings,
                                                                                 estimator))
    return model
