"""UNet shapes, heads, gradients and strict weight transfer (tiny widths, 32x32 inputs)."""

from __future__ import annotations

import pytest
import torch

from trainers.config import ModelConfig
from trainers.model import PARTS, UNet, count_parameters, strip_wrapper_prefixes, transfer_weights


def tiny(**overrides: object) -> ModelConfig:
    values: dict[str, object] = dict(
        base_channels=4, depth=2, norm="instance", embed_dim=8, global_hidden=16, local_hidden=6
    )
    values.update(overrides)
    return ModelConfig(**values)  # type: ignore[arg-type]


def make(seed: int = 0, **overrides: object) -> UNet:
    torch.manual_seed(seed)
    return UNet(tiny(**overrides))


# (depth, base, norm, H, W)
SHAPE_CASES = [
    (1, 4, "instance", 32, 32),
    (2, 4, "batch", 32, 16),
    (3, 8, "group", 32, 32),
    (3, 6, "group", 16, 24),  # group count 6 (largest <= 8 dividing 6)
    (2, 5, "none", 8, 12),
]


@pytest.mark.parametrize(("depth", "base", "norm", "height", "width"), SHAPE_CASES)
def test_shapes(depth: int, base: int, norm: str, height: int, width: int) -> None:
    model = make(depth=depth, base_channels=base, norm=norm)
    x = torch.rand(2, 1, height, width)
    feats = model.encode(x)
    assert [tuple(f.shape) for f in feats] == [
        (2, base * 2**level, height // 2**level, width // 2**level) for level in range(depth + 1)
    ]
    assert model.decode(feats).shape == (2, base, height, width)
    assert model(x).shape == (2, 3, height, width)
    assert model.global_embedding(x).shape == (2, 8)
    assert model.local_embedding(x).shape == (2, 8, height, width)


def test_reference_widths_and_parameter_count() -> None:
    model = UNet(ModelConfig())  # base 64, depth 4: 64-128-256-512 and a 1024 centre
    widths = [level[0].out_channels for level in model.encoder.levels]
    assert widths == [64, 128, 256, 512, 1024]
    assert model.decoder.blocks[-1][-3].out_channels == 64
    body = count_parameters(model.encoder) + count_parameters(model.decoder)
    assert 30e6 < body < 33e6  # the classic 2D U-Net's ~31M
    # global head on the flattened 4x4 centre: 1024*16 -> 512 -> 128
    assert count_parameters(model.global_head) == 1024 * 16 * 512 + 512 + 512 * 128 + 128


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2, 1, 30, 32), "divisible by 4"),
        ((2, 1, 32, 18), "divisible by 4"),
        ((2, 3, 32, 32), r"\(B, 1, H, W\)"),
        ((1, 32, 32), r"got \(1, 32, 32\)"),
        ((2, 1, 4, 4), "larger than 1x1"),
    ],
)
def test_bad_input_raises_naming_shape(shape: tuple[int, ...], match: str) -> None:
    model = make()
    with pytest.raises(ValueError, match=match):
        model(torch.rand(*shape))


def test_constructor_and_output_validation() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        UNet(tiny(), num_classes=1)
    with pytest.raises(ValueError, match="in_channels"):
        UNet(tiny(), in_channels=0)
    with pytest.raises(ValueError, match="unknown output"):
        make()(torch.rand(1, 1, 8, 8), output="bogus")


def test_multichannel_input_and_class_count() -> None:
    torch.manual_seed(0)
    model = UNet(tiny(), in_channels=2, num_classes=5)
    assert model(torch.rand(1, 2, 16, 16)).shape == (1, 5, 16, 16)


def test_embeddings_have_unit_norm_and_forward_selects_them() -> None:
    model = make(norm="batch").eval()
    x = torch.rand(3, 1, 16, 16)
    z = model.global_embedding(x)
    e = model.local_embedding(x)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3, 16, 16))
    torch.testing.assert_close(model(x, output="global"), z)
    torch.testing.assert_close(model(x, output="local"), e)
    features, logits = model.features_and_logits(x)
    assert features.shape == (3, 4, 16, 16)
    torch.testing.assert_close(logits, model(x))


def test_global_head_is_nonlinear() -> None:
    linear_layers = [m for m in make().global_head if isinstance(m, torch.nn.Linear)]
    assert len(linear_layers) == 2
    assert any(isinstance(m, torch.nn.ReLU) for m in make().global_head)


@pytest.mark.parametrize(
    ("output", "trained", "untouched"),
    [
        ("global", ("encoder", "global_head"), ("decoder", "local_head", "seg_head")),
        ("local", ("encoder", "decoder", "local_head"), ("global_head", "seg_head")),
        ("logits", ("encoder", "decoder", "seg_head"), ("global_head", "local_head")),
    ],
)
def test_gradients_reach_exactly_the_used_parts(
    output: str, trained: tuple[str, ...], untouched: tuple[str, ...]
) -> None:
    model = make()
    x = torch.rand(2, 1, 16, 16)
    out = model(x, output=output)
    (out * torch.randn_like(out)).sum().backward()
    for part in trained:
        for name, p in getattr(model, part).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{part}.{name} got no gradient"
    for part in untouched:
        assert all(p.grad is None for p in getattr(model, part).parameters()), part


def test_channels_last_and_bf16_autocast() -> None:
    model = make().to(memory_format=torch.channels_last)
    x = torch.rand(2, 1, 16, 16).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        z = model.global_embedding(x)
        e = model.local_embedding(x)
    assert logits.shape == (2, 3, 16, 16) and torch.isfinite(logits).all()
    assert z.dtype == e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2, 16, 16))


# ---------------------------------------------------------------------------------- transfer


def keys_of(model: UNet, parts: tuple[str, ...]) -> list[str]:
    return [k for k in model.state_dict() if k.split(".", 1)[0] in parts]


@pytest.mark.parametrize(
    "parts", [("encoder",), ("encoder", "decoder"), ("encoder", "global_head"), PARTS, ()]
)
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_transfer_loads_exactly_the_requested_parts(parts: tuple[str, ...], prefix: str) -> None:
    source, target = make(seed=1, norm="batch"), make(seed=2, norm="batch")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = {prefix + k: v for k, v in source.state_dict().items()}
    loaded = transfer_weights(state, target, parts)
    assert loaded == keys_of(target, parts)
    after, src = target.state_dict(), source.state_dict()
    for key, value in after.items():
        if key in loaded:
            assert torch.equal(value, src[key]), key
        else:
            assert torch.equal(value, before[key]), key
    assert (
        any(not torch.equal(after[k], src[k]) for k in after if k not in loaded) or parts == PARTS
    )


def test_transfer_ignores_other_parts_missing_from_state() -> None:
    source, target = make(seed=1), make(seed=2)
    state = {k: v for k, v in source.state_dict().items() if k.startswith("encoder.")}
    assert transfer_weights(state, target, ["encoder"]) == keys_of(target, ("encoder",))


def test_transfer_missing_key_raises_and_copies_nothing() -> None:
    source, target = make(seed=1), make(seed=2)
    state = dict(source.state_dict())
    del state["decoder.up.0.weight"]
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing \(1\): decoder\.up\.0\.weight"):
        transfer_weights(state, target, ["encoder", "decoder"])
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_transfer_unexpected_key_raises() -> None:
    source, target = make(seed=1), make(seed=2)
    state = {**source.state_dict(), "encoder.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected \(1\): encoder\.extra\.weight"):
        transfer_weights(state, target, ["encoder"])


def test_transfer_shape_mismatch_raises() -> None:
    wide, narrow = make(base_channels=8), make(base_channels=4)
    with pytest.raises(
        ValueError,
        match=r"shape mismatch .*encoder\.levels\.0\.0\.weight: state \(8, 1, 3, 3\) vs model \(4, 1, 3, 3\)",
    ):
        transfer_weights(wide.state_dict(), narrow, ["encoder"])


def test_transfer_norm_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="running_mean"):
        transfer_weights(make(norm="instance").state_dict(), make(norm="batch"), ["encoder"])


@pytest.mark.parametrize("parts", [["encoder", "projection"], "encoder"])
def test_transfer_bad_parts_raise(parts: object) -> None:
    model = make()
    with pytest.raises(ValueError, match="unknown model parts|sequence of part names"):
        transfer_weights(model.state_dict(), model, parts)  # type: ignore[arg-type]


def test_transfer_duplicate_keys_after_stripping_raise() -> None:
    state = make().state_dict()
    doubled = {**state, **{"module." + k: v for k, v in state.items()}}
    with pytest.raises(ValueError, match="twice"):
        transfer_weights(doubled, make(), ["encoder"])


def test_strip_wrapper_prefixes() -> None:
    assert strip_wrapper_prefixes("module._orig_mod.encoder.x") == "encoder.x"
    assert strip_wrapper_prefixes("_orig_mod.module.seg_head.weight") == "seg_head.weight"
    assert strip_wrapper_prefixes("encoder.module.x") == "encoder.module.x"


class CompiledStandIn(torch.nn.Module):
    """Holds the model as ``_orig_mod`` like torch.compile's OptimizedModule (without importing
    dynamo, which takes seconds): its state_dict keys carry the same ``_orig_mod.`` prefix."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = model


def test_transfer_from_and_into_a_compiled_wrapper() -> None:
    source, target = make(seed=1), make(seed=2)
    wrapped_source = CompiledStandIn(source)
    assert next(iter(wrapped_source.state_dict())).startswith("_orig_mod.")
    loaded = transfer_weights(wrapped_source.state_dict(), CompiledStandIn(target), ["encoder"])  # type: ignore[arg-type]
    assert loaded == keys_of(target, ("encoder",))
    assert all(torch.equal(target.state_dict()[k], source.state_dict()[k]) for k in loaded)


def test_transfer_into_a_non_unet_raises() -> None:
    with pytest.raises(ValueError, match="expects a UNet"):
        transfer_weights({}, torch.nn.Linear(1, 1), ["encoder"])  # type: ignore[arg-type]
