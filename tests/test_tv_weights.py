"""Pretrained torchvision weights without torchvision reading them (issue 19 item 7).

nnctl calls the builder with weights=None and the arguments torchvision's builder sets itself
when it is given weights, reads the cached file through the public
torch.hub.load_state_dict_from_url(weights_only=True) and loads it strictly. Each test here
compares the result with torchvision's own builder given the weights (which reads the same
file from a private torch hub cache: no download), on models whose builder does more than
set num_classes. The weights are the tests' own seeded random init.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
import torchvision
from torchvision import models as TVM

from nnctl.config import loader as C
from nnctl.errors import ConfigError
from nnctl.model import plan as M

from .conftest import make


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def cache(folder, weights, state: dict) -> None:
    torch.save(state, folder / os.path.basename(weights.url))


def nnctl_build(model: dict, seed: int = 0, pretrained: bool | None = None):
    cfg, doc = C.from_dict(make(model=model), "c.yaml")
    return M.build(cfg, doc, seed=seed, pretrained=pretrained)


def torchvision_build(name: str, weights, seed: int = 0, **kwargs):
    """torchvision's own builder given the weights, seeded as nnctl seeds a build; and the RNG after it."""
    torch.manual_seed(seed)
    net = TVM.get_model(name, weights=weights, **kwargs)
    return net, torch.get_rng_state()


def assert_same_model(ours: torch.nn.Module, theirs: torch.nn.Module, shape: tuple) -> None:
    assert type(ours) is type(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs.eval()(x))


def test_googlenet_as_torchvision_builds_it(hub_dir):
    """transform_input on, init_weights off, loaded with the auxiliary heads, then dropped (the default)."""
    w = TVM.GoogLeNet_Weights.IMAGENET1K_V1
    torch.manual_seed(7)
    cache(hub_dir, w, TVM.googlenet(aux_logits=True, init_weights=False).state_dict())
    theirs, rng = torchvision_build("googlenet", w)
    ours, _ = nnctl_build({"torchvision": "googlenet", "weights": "IMAGENET1K_V1", "input_shape": [3, 64, 64]})
    assert torch.equal(torch.get_rng_state(), rng)  # the same random numbers drawn by the construction
    assert ours.transform_input is True and ours.aux_logits is False and ours.aux1 is None and ours.aux2 is None
    assert_same_model(ours, theirs, (3, 64, 64))
    # a checkpoint's rebuild (pretrained=False) is the same architecture, transform_input included
    again, _ = nnctl_build({"torchvision": "googlenet", "weights": "IMAGENET1K_V1", "input_shape": [3, 64, 64]},
                           pretrained=False)
    assert again.transform_input is True and list(again.state_dict()) == list(theirs.state_dict())


def test_densenet_old_checkpoint_keys_are_renamed_as_torchvision_does(hub_dir):
    w = TVM.DenseNet121_Weights.IMAGENET1K_V1
    torch.manual_seed(7)
    state = TVM.densenet121().state_dict()
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.(weight|bias|running_mean|running_var)$",
                  r"\1.\2.\3", k): v for k, v in state.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old  # the layout of torchvision's published file
    cache(hub_dir, w, old)
    theirs, rng = torchvision_build("densenet121", w)
    ours, _ = nnctl_build({"torchvision": "densenet121", "weights": "IMAGENET1K_V1", "input_shape": [3, 32, 32]})
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_model(ours, theirs, (3, 32, 32))


def test_a_file_that_needs_unpickling_code_is_refused(hub_dir):
    """weights_only=True: a pickled object other than tensors is refused, not run (torchvision's builder loads
    with weights_only=False)."""
    w = TVM.ResNet18_Weights.IMAGENET1K_V1
    cache(hub_dir, w, {"fc.weight": torch.zeros(2), "note": torchvision.transforms.ToTensor()})
    with pytest.raises(ConfigError) as info:
        nnctl_build({"torchvision": "resnet18", "weights": "IMAGENET1K_V1", "input_shape": [3, 32, 32]})
    (p,) = info.value.problems
    assert p.path == "model.weights"
    assert p.message.startswith(f"{hub_dir / os.path.basename(w.url)} does not hold the weights of resnet18: ")
    assert "Weights only load failed" in p.message


def test_a_state_dict_of_another_model_is_refused_at_weights(hub_dir):
    w = TVM.ResNet18_Weights.IMAGENET1K_V1
    cache(hub_dir, w, TVM.resnet34().state_dict())
    with pytest.raises(ConfigError) as info:
        nnctl_build({"torchvision": "resnet18", "weights": "IMAGENET1K_V1", "input_shape": [3, 32, 32]})
    (p,) = info.value.problems
    assert p.path == "model.weights" and "does not hold the weights of resnet18" in p.message
    assert "Unexpected key(s) in state_dict: \"layer1.2.conv1.weight\"" in p.message


def test_vit_weights_fix_image_size_in_the_plan():
    """vit_b_16's SWAG weights are for 384x384 (torchvision's builder sets image_size): the plan says so."""
    cfg, doc = C.from_dict(make(model={"torchvision": "vit_b_16", "weights": "IMAGENET1K_SWAG_E2E_V1",
                                       "input_shape": [3, 224, 224], "args": {"image_size": 224}}), "c.yaml")
    with pytest.raises(ConfigError) as info:
        M.plan(cfg, doc)
    (p,) = info.value.problems
    assert p.path == "model.args.image_size"
    assert p.message == ("the ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1 weights need image_size 384, not 224: "
                         "leave image_size out")
    with pytest.raises(ValueError, match="expected value 384 but got 224"):  # torchvision's own refusal
        TVM.get_model("vit_b_16", weights=TVM.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1, image_size=224)
    cfg, doc = C.from_dict(make(model={"torchvision": "vit_b_16", "weights": "IMAGENET1K_SWAG_E2E_V1",
                                       "input_shape": [3, 224, 224]}), "c.yaml")
    with pytest.raises(ConfigError) as info:  # planned as built: 384, so a 224 input is refused by check
        M.plan(cfg, doc)
    (p,) = info.value.problems
    assert p.path == "model.input_shape" and "Wrong image height! Expected 384 but got 224!" in p.message


@pytest.mark.slow
def test_inception_v3_without_aux_heads_equals_torchvisions_with_them_dropped(hub_dir):
    """torchvision refuses aux_logits=False with weights; nnctl loads with them and drops them, as torchvision's
    builder does for googlenet (and as the plan's 'set args: {aux_logits: false}' asks)."""
    w = TVM.Inception_V3_Weights.IMAGENET1K_V1
    torch.manual_seed(7)
    cache(hub_dir, w, TVM.inception_v3(aux_logits=True, init_weights=False).state_dict())
    with pytest.raises(ValueError, match="aux_logits"):
        TVM.get_model("inception_v3", weights=w, aux_logits=False)
    theirs, rng = torchvision_build("inception_v3", w)
    ours, _ = nnctl_build({"torchvision": "inception_v3", "weights": "IMAGENET1K_V1", "input_shape": [3, 80, 80],
                           "args": {"aux_logits": False}})
    assert torch.equal(torch.get_rng_state(), rng)
    assert ours.transform_input is True and ours.aux_logits is False and ours.AuxLogits is None
    theirs.aux_logits, theirs.AuxLogits = False, None
    assert_same_model(ours, theirs, (3, 80, 80))


@pytest.mark.slow
def test_vgg_skips_the_init_torchvision_skips(hub_dir):
    """vgg's builder sets init_weights=False with weights: the same random numbers drawn, the same model."""
    w = TVM.VGG11_Weights.IMAGENET1K_V1
    torch.manual_seed(7)
    cache(hub_dir, w, TVM.vgg11().state_dict())
    theirs, rng = torchvision_build("vgg11", w)
    ours, _ = nnctl_build({"torchvision": "vgg11", "weights": "IMAGENET1K_V1", "input_shape": [3, 32, 32]})
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_model(ours, theirs, (3, 32, 32))
