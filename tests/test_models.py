"""Model registry: every model builds and gives the right output shapes on a small batch."""

from urllib.error import URLError

import pytest
import torch

from crackray.errors import ConfigError
from crackray.models import (
    create_model,
    list_models,
    model_segments,
    register_model,
    split_parameters,
)
from crackray.models.segdec import SegDecNet

TORCHVISION = [
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet_b0",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "convnext_tiny",
]


OWN = ["simple_cnn", "test_tiny", "segdec", "segdec_tiny"]


def test_registry_lists_every_model():
    assert set(list_models()) == {*TORCHVISION, *OWN, "efficientnet_lite0"}
    assert list_models() == sorted(list_models())


def test_only_segdec_segments():
    assert [name for name in list_models() if model_segments(name)] == ["segdec", "segdec_tiny"]
    with pytest.raises(ConfigError, match="Invalid model 'resnet1000'"):
        model_segments("resnet1000")


@pytest.mark.parametrize("name", sorted(set(list_models()) - {"segdec", "segdec_tiny"}))
def test_classifier_gives_one_logit_per_image(name):
    torch.manual_seed(0)
    model = create_model(name, dropout=0.2).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2,)
    assert torch.isfinite(out).all()


def test_dropout_reaches_the_head():
    model = create_model("resnet18", dropout=0.3)
    assert [m.p for m in model.fc.modules() if isinstance(m, torch.nn.Dropout)] == [0.3]


@pytest.mark.parametrize("name", ["segdec", "segdec_tiny"])
def test_segdec_gives_decision_and_seg_map(name):
    model = create_model(name, image_size=64).eval()
    with torch.no_grad():
        dec, seg = model(torch.randn(2, 3, 64, 96))
    assert dec.shape == (2,)
    assert seg.shape == (2, 1, 8, 12)


def test_segdec_rejects_sizes_not_divisible_by_8():
    with pytest.raises(ConfigError, match="multiple of 8"):
        create_model("segdec_tiny", image_size=100)
    with pytest.raises(ValueError, match="divisible by 8"):
        create_model("segdec_tiny")(torch.randn(1, 3, 60, 64))


def test_unknown_model_lists_supported_ones():
    with pytest.raises(ConfigError) as err:
        create_model("resnet1000")
    message = str(err.value)
    assert message.startswith("Invalid model 'resnet1000'. Supported: ")
    assert all(name in message for name in list_models())


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="twice"):
        register_model("test_tiny")(lambda pretrained, dropout, image_size: None)


@pytest.mark.parametrize("name", OWN)
def test_own_models_refuse_pretrained(name):
    with pytest.raises(ConfigError, match="no pretrained weights"):
        create_model(name, pretrained=True)


@pytest.mark.parametrize("name", list_models())
def test_head_is_the_new_one_logit_layer_and_the_rest_is_backbone(name):
    model = create_model(name, dropout=0.1)
    backbone, head = split_parameters(model)
    assert [p.shape[0] for p in head] == [1, 1]  # Linear(features, 1): its weight and bias
    assert backbone
    assert {id(p) for p in backbone} | {id(p) for p in head} == {id(p) for p in model.parameters()}
    assert not {id(p) for p in backbone} & {id(p) for p in head}


@pytest.mark.parametrize("name", ["test_tiny", "segdec_tiny", "resnet18"])
def test_weights_file_of_the_same_model_loads_exactly(tmp_path, name):
    torch.manual_seed(1)
    saved = create_model(name, image_size=64)
    path = tmp_path / "weights.pt"
    torch.save(saved.state_dict(), path)
    loaded = create_model(name, image_size=64, weights=str(path))
    for key, tensor in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_weights_file_of_another_model_is_one_line(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(create_model("test_tiny").state_dict(), path)
    with pytest.raises(ConfigError) as err:
        create_model("simple_cnn", weights=str(path))
    message = str(err.value)
    assert message.startswith(f"model.weights: {path} does not match a crackray 'simple_cnn' model")
    assert "missing keys (e.g. 'features.0.0.weight')" in message and "\n" not in message


def test_weights_file_in_torchvision_layout_loads_the_backbone(tmp_path):
    import torchvision  # here, not at the top: crackray must be imported first (compat patch)

    torch.manual_seed(2)
    imagenet = torchvision.models.resnet18(weights=None)  # stands in for a downloaded file
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(imagenet.state_dict(), path)
    model = create_model("resnet18", weights=str(path))
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var)
    assert model.fc[1].out_features == 1  # the 1000-class classifier was replaced


def test_pretrained_without_internet_is_one_line(monkeypatch):
    import torchvision

    def offline(weights=None):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models, "resnet18", offline)
    with pytest.raises(ConfigError) as err:
        create_model("resnet18", pretrained=True)
    message = str(err.value)
    assert message.startswith("model.pretrained: cannot fetch resnet18's ImageNet weights (URLE")
    assert message.endswith("use efficientnet_lite0, whose weights ship in a package")


@pytest.mark.parametrize("pretrained", [True, False])
@pytest.mark.parametrize("name", TORCHVISION)
def test_pretrained_requests_default_weights(monkeypatch, name, pretrained):
    import torchvision  # here, not at the top: crackray must be imported first (compat patch)

    real_builder = getattr(torchvision.models, name)
    requested = []

    def fake_builder(weights=None):
        requested.append(weights)
        return real_builder(weights=None)  # never downloads

    monkeypatch.setattr(torchvision.models, name, fake_builder)
    model = create_model(name, pretrained=pretrained)
    expected = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    assert requested == [expected]
    assert model(torch.randn(2, 3, 64, 64)).shape == (2,)


def test_simple_cnn_is_small():
    n = sum(p.numel() for p in create_model("simple_cnn").parameters())
    assert 50_000 < n < 150_000


def _seg_grads_after_decision_loss(adjust: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = SegDecNet(base_channels=4, feature_channels=8, kernel_size=3, feature_kernel=3)
    model.gradient_adjustment = adjust
    dec, _ = model(torch.randn(2, 3, 32, 32))
    dec.sum().backward()
    seg_params = [*model.segmentation.parameters(), *model.seg_head.parameters()]
    assert all(p.grad is not None for p in model.head.parameters())
    return [p.grad for p in seg_params]


def test_gradient_adjustment_stops_decision_grads_at_seg_subnet():
    adjusted = _seg_grads_after_decision_loss(adjust=True)
    assert all(g is None or not g.any() for g in adjusted)
    plain = _seg_grads_after_decision_loss(adjust=False)
    assert all(g is not None for g in plain)
    assert all(g.abs().sum() > 0 for g in plain if g.dim() > 1)  # conv weights
